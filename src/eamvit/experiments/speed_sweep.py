"""Accuracy at measured speed: freezing by entry, row or head next to token pruning and merging, on the sweep
runner. Design (timing, images/s, the rows): ``docs/architecture-experiments.md``, "speed_sweep".
"""
from __future__ import annotations

import copy
import statistics
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from torch import nn

from eamvit.experiments.freeze_sweep import freeze_point
from eamvit.experiments.prune_sweep import kappa, merge_columns, reduce_points
from eamvit.experiments.results import Column, ResultRow
from eamvit.experiments.runner import Applied, EvalData, Point, Timing, measure_speedup, run_sweep
from eamvit.methods.calibrate import EntropyMaps
from eamvit.methods.cost import cost_account
from eamvit.methods.freeze import FreezeConfig
from eamvit.methods.merge import MergeConfig
from eamvit.methods.prune import PruneConfig
from eamvit.methods.reduce import row_label
from eamvit.modules.attention import attention_layers, require


def row_method(row: Mapping[str, Any]) -> str:
    """Display name of a speed-sweep row: ``unmodified``, ``freeze (G)``, ``prune (method)`` or ``merge (method)``."""
    if row.get("granularity"):
        return f"freeze ({row['granularity']})"
    if row.get("prune"):
        return f"prune ({row_label(row)})"
    if row.get("merge"):
        return f"merge ({row_label(row)})"
    return "unmodified"


def supports(model: nn.Module, verb: str) -> bool:
    """Whether every attention layer's adapter declares ``verb`` (``eamvit models``)."""
    return all(verb in layer.eam.adapter.verbs for layer in attention_layers(model))


def check_family(model: nn.Module, granularities: Sequence[str], prune_methods: Sequence[Any],
                 merges: Sequence[Any] = ()) -> None:
    """One clear error, before any work or output, for what the model's attention family does not support
    (a non-empty ``prune_methods`` or ``merges`` asks for token pruning or merging)."""
    layers = attention_layers(model)
    for granularity in granularities:
        require(layers, granularity)
    if prune_methods:
        require(layers, "prune")
    if merges:
        require(layers, "merge")


def speed_sweep(model: nn.Module, maps: EntropyMaps, data: EvalData, freeze: Sequence[FreezeConfig],
                prune: Sequence[PruneConfig], merges: Sequence[tuple[float, MergeConfig]] = (),
                timing: Timing = Timing(), progress: bool = True) -> list[ResultRow]:
    """Top-1, executed GMACs, the predicted and the measured speed-up of every point, the unmodified model first.

    The model is deep-copied once as the unmodified reference of the timing (memory: two models).

    Args:
        freeze: one config per freezing point (τ > 0; ``"row"`` granularity on ViT/DeiT only).
        prune: one config per pruning point (none for Swin).
        merges: ``(κ, config)`` of the merging points, each at the ``r`` whose GMACs match Shannon pruning's at
            κ (:func:`~eamvit.experiments.prune_sweep.matched_merges`).
    """
    check_family(model, list(dict.fromkeys(f.granularity for f in freeze)), prune, merges)
    reference = copy.deepcopy(model).eval()  # unmodified, timed beside every point
    reference_rates: list[float] = []

    def measure(m: nn.Module) -> dict[str, Any]:
        """The cost model's GMACs (executed, skippable) and predicted speed-up, then the measured one."""
        speed = measure_speedup(m, reference, timing, device=data.device)
        reference_rates.append(speed.pop("reference_images_per_s"))
        acct = cost_account(m)
        sig = lambda macs: float(f"{macs / 1e9:.6g}")  # six significant digits: tiny models too
        return {"gmacs": sig(acct.total("executed")), "gmacs_skippable": sig(acct.total("skippable")),
                "predicted_speedup": round(acct.predicted_speedup, 4), **speed}

    @contextmanager
    def unmodified(m: nn.Module, seed: int) -> Iterator[Applied]:
        yield Applied(measure(m))

    base = merge_columns({"label": "", "selection": None, "granularity": None, "tau": None, "prune": None,
                          "alpha": None, "keep_rate": None}, merges)
    points = [Point(base, unmodified)]
    for cfg in freeze:
        fields = {**base, "selection": cfg.selection, "granularity": cfg.granularity, "tau": cfg.tau}
        points.append(freeze_point(maps, cfg, fields, measure=lambda m, rep: measure(m)))
    points += reduce_points(base, prune, merges, measure)
    rows = run_sweep(model, data, points, progress=progress, desc="speed sweep")
    rate = statistics.median(reference_rates)
    for r in rows:
        r.fields.update({k.replace("speedup", "images_per_s"): round(rate * r[k], 2)
                         for k in ("speedup", "speedup_p25", "speedup_p75")})
    return rows


SPEED_COLUMNS = (Column("method", derive=row_method), Column("tau", "τ", "g"),
                 Column("keep_rate", "κ (merging: its GMACs)", "g", derive=kappa),
                 Column("merge_r", "r per block"),
                 Column("top1", "top-1 (%)", ".2f"), Column("gmacs", "GMACs/image", ".4g"),
                 Column("gmacs_skippable", "skippable with a sparse kernel", ".4g"),
                 Column("predicted_speedup", "predicted ×", ".3f"), Column("speedup", "measured ×", ".3f"),
                 Column("speedup_p25", "p25", ".3f"), Column("speedup_p75", "p75", ".3f"),
                 Column("images_per_s", "images/s", ".0f"))


def plot_rows(rows: Sequence[ResultRow]) -> list[dict[str, Any]]:
    """The input of :func:`eamvit.plots.speed.plot_top1_vs_speedup` from sweep rows."""
    out = []
    for r in rows:
        k = kappa(r)
        point = f"τ={r['tau']:g}" if r["granularity"] else (f"κ={k:g}" if k is not None else None)
        out.append({"method": row_method(r), "speedup": r["speedup"], "speedup_lo": r["speedup_p25"],
                    "speedup_hi": r["speedup_p75"], "top1": r["top1"], "point": point})
    return out


def summary_lines(rows: Sequence[ResultRow], max_drops: Sequence[float] = (1.0, 5.0)) -> list[str]:
    """What :func:`speed_sweep`'s rows answer, in words: for freezing, pruning and merging, the fastest measured
    point that loses at most each of ``max_drops`` top-1 points, and what entry-level freezing costs."""
    base = rows[0]
    lines = []
    for drop in max_drops:
        for prefix, name in (("freeze", "freezing"), ("prune", "token pruning"), ("merge", "token merging")):
            if not any(row_method(r).startswith(prefix) for r in rows):
                continue
            ok = [r for r in rows if row_method(r).startswith(prefix) and r["top1"] >= base["top1"] - drop]
            if not ok:
                lines.append(f"within {drop:g} top-1 point(s), {name}: no point")
                continue
            best = max(ok, key=lambda r: r["speedup"])
            knob = (f"τ={best['tau']:g}" if best["granularity"] else f"κ={best['keep_rate']:g}" if best["prune"]
                    else f"r={best['merge_r']} (κ={best['matched_keep_rate']:g}'s GMACs)")
            verdict = "faster than" if best["speedup_p25"] > 1 else (
                "slower than" if best["speedup_p75"] < 1 else "not clearly faster than")
            lines.append(f"within {drop:g} top-1 point(s), {name}: fastest is {row_method(best)} at {knob}, top-1 "
                         f"{best['top1']:.2f} (unmodified {base['top1']:.2f}), measured ×{best['speedup']:.3f} "
                         f"(predicted ×{best['predicted_speedup']:.3f}): {verdict} the unmodified model")
    entry = [r["speedup"] for r in rows if r["granularity"] == "entry"]
    if entry:
        lines.append(f"entry-level freezing executes every MAC (predicted ×1.000) and measured ×{min(entry):.3f}"
                     f"..×{max(entry):.3f}: simulating frozen entries costs time and saves none")
    return lines
