"""Accuracy at measured speed: structured freezing (entry, row, head) next to token pruning, on the sweep runner.

Every point is evaluated and timed by :func:`eamvit.experiments.runner.run_sweep` (median and
interquartile range of ``timing.reps`` forwards after warm-up) and carries the cost model's executed
GMACs and predicted speed-up (:func:`eamvit.methods.cost.cost_account`). ``speedup`` is the point's
median images/s divided by the unmodified model's, timed in the same sweep; ``speedup_p25``/``p75``
divide its quartiles by the unmodified median.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

from torch import nn

from eamvit.experiments.freeze_sweep import freeze_point
from eamvit.experiments.results import ResultRow
from eamvit.experiments.runner import Applied, EvalData, Point, Timing, run_sweep
from eamvit.methods.calibrate import EntropyMaps
from eamvit.methods.cost import cost_account
from eamvit.methods.freeze import FreezeConfig
from eamvit.methods.prune import PruneConfig, method_config, prune_, unprune_

PRUNE_METHODS: tuple[tuple[str, Optional[float]], ...] = (("shannon", None), ("renyi", 2.0), ("evit", None))


def cost_fields(model: nn.Module) -> dict[str, Any]:
    """The cost model's numbers for a row: executed GMACs, skippable GMACs, predicted speed-up."""
    acct = cost_account(model)
    s = acct.summary()
    return {"gflops": round(acct.gmacs, 4), "gflops_skippable": round(s["gmacs_skippable"], 4),
            "predicted_speedup": s["predicted_speedup"]}


def _pruned(config: PruneConfig):
    @contextmanager
    def state(model: nn.Module, seed: int) -> Iterator[Applied]:
        prune_(model, config)
        try:
            yield Applied(cost_fields(model))
        finally:
            unprune_(model)
    return state


@contextmanager
def _unmodified(model: nn.Module, seed: int) -> Iterator[Applied]:
    yield Applied(cost_fields(model))


def speed_points(maps: EntropyMaps, taus: Sequence[float], granularities: Sequence[str],
                 prune_methods: Sequence[tuple[str, Optional[float]]] = PRUNE_METHODS,
                 keep_rates: Sequence[float] = (0.9, 0.7, 0.5), selection: str = "entropy",
                 label: str = "") -> list[Point]:
    """The unmodified model, then one point per (granularity, τ) and per (pruning method, κ)."""
    base = {"label": label, "method": "unmodified", "granularity": "", "tau": 0.0, "keep_rate": 1.0}
    points = [Point(base, _unmodified)]
    for gran in granularities:
        for tau in taus:
            cfg = FreezeConfig(tau=tau, granularity=gran, selection=selection).validate()
            fields = {**base, "method": f"freeze ({gran})", "granularity": gran, "tau": tau}
            points.append(freeze_point(maps, cfg, fields, measure=lambda m, rep: cost_fields(m)))
    for method, alpha in prune_methods:
        for k in keep_rates:
            cfg = method_config(method, alpha, k)
            points.append(Point({**base, "method": f"prune ({cfg.label})", "keep_rate": k}, _pruned(cfg)))
    return points


def speed_sweep(model: nn.Module, maps: EntropyMaps, data: EvalData, taus: Sequence[float],
                granularities: Sequence[str] = ("entry", "row", "head"),
                prune_methods: Sequence[tuple[str, Optional[float]]] = PRUNE_METHODS,
                keep_rates: Sequence[float] = (0.9, 0.7, 0.5), timing: Timing = Timing(),
                selection: str = "entropy", label: str = "", progress: bool = True) -> list[ResultRow]:
    """Top-1, executed GMACs, measured images/s and the predicted speed-up of every point.

    Args:
        model: a timm model (left unmodified).
        maps: its entropy maps.
        data: evaluation data.
        taus: sparsity levels of the freezing points.
        granularities: ``"entry"``, ``"row"`` (ViT only) and/or ``"head"``.
        prune_methods: ``(method, alpha)`` of the pruning points (none for Swin).
        keep_rates: κ of the pruning points.
        timing: how each point is timed.
        selection: ``"entropy"`` or ``"random"`` freezing.
        label: copied into every row.
        progress: progress bar.

    Returns:
        Rows with ``method``, ``granularity``, ``tau``, ``keep_rate``, top-1/top-5, ``gflops``,
        ``predicted_speedup``, ``images_per_s`` (+ quartiles) and ``speedup`` (+ quartiles).
    """
    points = speed_points(maps, taus, granularities, prune_methods, keep_rates, selection, label)
    rows = run_sweep(model, data, points, timing=timing, progress=progress, desc=f"speed sweep {label}".strip())
    base = rows[0].images_per_s
    for r in rows:
        r.fields.update(speedup=round(r.images_per_s / base, 4), speedup_p25=round(r.images_per_s_p25 / base, 4),
                        speedup_p75=round(r.images_per_s_p75 / base, 4))
    return rows


def plot_rows(rows: Sequence[ResultRow]) -> list[dict[str, Any]]:
    """The plot's input (:func:`eamvit.plots.speed.plot_top1_vs_speedup`) from sweep rows."""
    out = []
    for r in rows:
        d = r.to_dict()
        point = f"τ={d['tau']:g}" if d["granularity"] else (f"κ={d['keep_rate']:g}" if d["keep_rate"] < 1 else None)
        out.append({"method": d["method"], "speedup": d["speedup"], "speedup_lo": d["speedup_p25"],
                    "speedup_hi": d["speedup_p75"], "top1": d["top1"], "point": point})
    return out
