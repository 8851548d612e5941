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
    """A sweep point that freezes the model with ``config`` (its ``seed`` replaced by each of ``seeds``); the row
    gets the freeze's ``frozen_fraction`` and ``frozen_window_masked``.

    Args:
        maps: entropy maps (and mean maps) of the model the sweep runs on.
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


def freeze_sweep(model: nn.Module, maps: EntropyMaps, data: EvalData, taus: Sequence[float],
                 freeze: FreezeConfig = FreezeConfig(), selections: Sequence[str] = ("entropy", "random"),
                 seeds: Sequence[int] = (0, 1, 2), label: str = "", progress: bool = True) -> list[ResultRow]:
    """Top-1 against τ for entropy and random freezing (the paper's Fig. 5/6): one row per (τ, selection) of
    ``freeze`` (its ``tau``, ``selection`` and ``seed`` replaced), random freezing at τ > 0 averaged over
    ``seeds``, the rest on seed 0. The model is left unfrozen."""
    points = []
    for tau in taus:
        for sel in selections:
            fields = {"label": label, "tau": tau, "selection": sel, "scope": freeze.resolved_scope,
                      "value_bits": freeze.value_bits if freeze.value_bits is not None else 32}
            run_seeds = list(seeds) if sel == "random" and tau > 0 else [0]
            points.append(freeze_point(maps, replace(freeze, tau=tau, selection=sel), fields, run_seeds))
    return run_sweep(model, data, points, progress=progress, desc=f"sweep {label}".strip())
