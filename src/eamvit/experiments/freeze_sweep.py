"""Top-1 against sparsity τ for entropy and random freezing (the paper's Fig. 5/6), on the sweep runner."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator, Optional, Sequence

from torch import nn

from eamvit.experiments.results import ResultRow
from eamvit.experiments.runner import Applied, EvalData, Point, run_sweep
from eamvit.methods.calibrate import EntropyMaps
from eamvit.methods.freeze import FreezeConfig, FreezeReport, freeze_, unfreeze_


def freeze_point(maps: EntropyMaps, config: FreezeConfig, fields: dict[str, Any], seeds: Sequence[int] = (0,),
                 value_deltas: Optional[Sequence] = None,
                 measure: Optional[Callable[[nn.Module, FreezeReport], dict[str, Any]]] = None) -> Point:
    """A sweep point that freezes the model with ``config`` (its ``seed`` replaced by each of ``seeds``).

    The row gets ``frozen_fraction`` and ``frozen_window_masked`` of the freeze; the model is
    unfrozen on exit.

    Args:
        maps: entropy maps (and mean maps) of the model the sweep runs on.
        config: :class:`~eamvit.methods.freeze.FreezeConfig`.
        fields: the row's label.
        seeds: seeds of the selection (one for entropy freezing, several for random).
        value_deltas: per-layer Δ of the frozen-value quantizer (see :func:`~eamvit.methods.freeze.freeze_`).
        measure: ``f(frozen model, report)`` returning more row fields (e.g. sizes).
    """
    @contextmanager
    def frozen(model: nn.Module, seed: int) -> Iterator[Applied]:
        report = freeze_(model, maps, replace(config, seed=seed), value_deltas=value_deltas)
        try:
            fields = {"frozen_fraction": round(report.frozen_fraction, 6),
                      "frozen_window_masked": report.frozen_window_masked}
            yield Applied({**fields, **(measure(model, report) if measure is not None else {})})
        finally:
            unfreeze_(model)

    return Point(fields, frozen, tuple(seeds))


def freeze_points(maps: EntropyMaps, taus: Sequence[float], scope: str = "head",
                  selections: Sequence[str] = ("entropy", "random"), seeds: Sequence[int] = (0, 1, 2),
                  value_bits: Optional[int] = None, value_quantizer: str = "uniform",
                  value_deltas: Optional[Sequence] = None, label: str = "") -> list[Point]:
    """One point per (τ, selection); random freezing at τ > 0 runs every seed, the rest seed 0."""
    points = []
    base = FreezeConfig(scope=scope, value_bits=value_bits, value_quantizer=value_quantizer)
    for tau in taus:
        for sel in selections:
            cfg = replace(base, tau=tau, selection=sel)
            fields = {"label": label, "tau": tau, "selection": sel, "scope": scope,
                      "value_bits": value_bits if value_bits is not None else 32}
            run_seeds = list(seeds) if sel == "random" and tau > 0 else [0]
            points.append(freeze_point(maps, cfg, fields, run_seeds, value_deltas))
    return points


def freeze_sweep(model: nn.Module, maps: EntropyMaps, data: EvalData, taus: Sequence[float], scope: str = "head",
                 selections: Sequence[str] = ("entropy", "random"), seeds: Sequence[int] = (0, 1, 2),
                 value_bits: Optional[int] = None, value_quantizer: str = "uniform",
                 value_deltas: Optional[Sequence] = None, label: str = "", progress: bool = True) -> list[ResultRow]:
    """Top-1 against τ for entropy and random freezing (the paper's Fig. 5/6).

    Random freezing is averaged over ``seeds`` (``top1_std`` is its standard deviation); entropy
    freezing is deterministic. The model is left unfrozen.

    Args:
        model: an instrumented model.
        maps: its entropy maps.
        data: evaluation data (:class:`~eamvit.experiments.runner.EvalData`).
        taus: sparsity levels.
        scope: ``"head"``, ``"layer"`` or ``"global"``.
        selections: ``"entropy"`` and/or ``"random"``.
        seeds: seeds of random freezing.
        value_bits: bits of the frozen values (``None``: fp32).
        value_quantizer: quantizer of the frozen values.
        value_deltas: its per-layer Δ.
        label: copied into every row.
        progress: progress bar.

    Returns:
        One row per (τ, selection) with ``label``, ``tau``, ``selection``, ``scope``, ``value_bits``,
        ``frozen_fraction``, ``frozen_window_masked`` and the accuracy fields.
    """
    points = freeze_points(maps, taus, scope, selections, seeds, value_bits, value_quantizer, value_deltas, label)
    return run_sweep(model, data, points, progress=progress, desc=f"sweep {label}".strip())
