"""Per-block token pruning: a greedy search that gives each pruning block its own keep rate and Rényi order.
The rule and its cost: ``docs/architecture-experiments.md``, "per_block_sweep".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.experiments.prune_sweep import pruned_gflops, pruned_state
from eamvit.experiments.results import Column, ResultRow
from eamvit.experiments.runner import EvalData, Point, run_sweep
from eamvit.methods.prune import PruneConfig, check_keep_rate, prune_, setting_text, unprune_

GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # the keep-rate grid of `sweep --prune` (1 is added)
ORDERS = (1.0, 2.0, math.inf)  # Shannon, collision entropy, min-entropy


@dataclass(frozen=True)
class PerBlockSweepConfig(Config):
    """What the per-block search chooses from.

    Args:
        prune: the base config: method, blocks, placement, keys, fusion, seed; its single ``keep_rate`` is
            the budget's (the uniform config's GMACs) and ``alpha`` is ignored for ``"renyi"`` in favour of
            ``alphas`` (it must be single-valued).
        keep_rates: the keep-rate grid each block moves down (1 is added).
        alphas: the Rényi orders tried per block, the first the starting one (``"renyi"`` only; empty:
            :data:`ORDERS` for ``"renyi"``, none for the other methods).
    """

    KIND = "per-block-sweep"
    VERSION = 1

    prune: PruneConfig = PruneConfig(method="renyi")
    keep_rates: tuple[float, ...] = GRID
    alphas: tuple[float, ...] = ()

    def _check(self) -> None:
        if self.prune.is_per_block:
            raise EamError("the per-block search starts from one keep rate and one Rényi order; give single values")
        if not self.keep_rates:
            raise EamError("the per-block search needs a keep-rate grid, e.g. 0.9,0.7,0.5")
        for k in self.keep_rates:
            check_keep_rate(k)
        for a in self.alphas:
            if not a >= 0:
                raise EamError(f"Rényi order {a} must be ≥ 0 (e.g. 0.5, 2, 3 or inf)")
        if self.prune.method != "renyi" and self.alphas:
            raise EamError(f"per-block Rényi orders apply to method 'renyi' only, not {self.prune.method!r}; "
                           "give renyi orders or no orders")

    @property
    def orders(self) -> tuple[float, ...]:
        """The Rényi orders tried per block (the base's for a method without an order)."""
        if self.prune.method != "renyi":
            return (self.prune.alpha,)
        return tuple(map(float, self.alphas)) or ORDERS

    @property
    def grid(self) -> tuple[float, ...]:
        """The keep rates a block can take, largest (1) first."""
        return tuple(sorted({1.0, *map(float, self.keep_rates)}, reverse=True))

    def uniform(self) -> PruneConfig:
        """The uniform config whose GMACs are the budget."""
        return self.config(self.prune.keep_rate, self.orders[0])

    def config(self, keep_rate: float | tuple[float, ...], alpha: float | tuple[float, ...]) -> PruneConfig:
        """The base config with these keep rates and orders (the order only for ``"renyi"``)."""
        if self.prune.method != "renyi":
            alpha = self.prune.alpha
        return dataclasses.replace(self.prune, keep_rate=keep_rate, alpha=alpha)


@dataclass
class PerBlockResult:
    """What :func:`per_block_sweep` found.

    Args:
        config: the chosen config (per-block tuples, or the uniform config when that scored higher).
        budget_gmacs: the uniform config's GMACs.
        rows: every scored config in search order, then the final rows on the evaluation images.
    """

    config: PruneConfig
    uniform: PruneConfig
    budget_gmacs: float
    rows: list[ResultRow]


class _Scorer:
    """Top-1 of configs on one image set through the sweep runner, each config evaluated once."""

    def __init__(self, model: nn.Module, data: EvalData, scored_on: str, progress: bool,
                 evaluate_fn: Optional[Callable[..., dict]]) -> None:
        self.model, self.data, self.scored_on = model, data, scored_on
        self.progress, self.evaluate_fn = progress, evaluate_fn
        self.seen: dict[PruneConfig, ResultRow] = {}
        self.rows: list[ResultRow] = []

    def score(self, configs: list[PruneConfig], step: int, phase: str) -> list[ResultRow]:
        """A row per config; new ones are evaluated and recorded with ``step`` and ``phase``."""
        new = [c for c in dict.fromkeys(configs) if c not in self.seen]
        points = [Point({"prune": c.method, "alpha": setting_text(c.order) if c.method == "renyi" else None,
                         "keep_rate": setting_text(c.keep_rate), "search_step": step, "search_phase": phase,
                         "scored_on": self.scored_on}, pruned_state(c)) for c in new]
        if points:
            rows = run_sweep(self.model, self.data, points, evaluate_fn=self.evaluate_fn, progress=self.progress,
                             desc=f"per-block {phase} {step}")
            self.seen.update(zip(new, rows))
            self.rows += rows
        return [self.seen[c] for c in configs]


class _Search:
    """The greedy search's state: each block's κ and order, the current config and its row."""

    def __init__(self, sweep: PerBlockSweepConfig, scorer: _Scorer, stages: int, budget: float) -> None:
        self.sweep, self.scorer, self.budget, self.grid = sweep, scorer, budget, sweep.grid
        self.rates, self.orders = [1.0] * stages, [sweep.orders[0]] * stages
        self.current = self._config(self.rates, self.orders)
        self.best = scorer.score([self.current], 0, "start")[0]
        self.step = 0

    def _config(self, rates: list[float], orders: list[float]) -> PruneConfig:
        return self.sweep.config(tuple(rates), tuple(orders))

    def descend(self) -> None:
        """Rule 2: while over the budget, take the best move of one block one grid step down."""
        grid = self.grid
        while self.best["gmacs"] > self.budget:
            self.step += 1
            moves = []
            for s, k in enumerate(self.rates):
                i = grid.index(k)
                if i + 1 < len(grid):
                    moves.append((s, self._config(self.rates[:s] + [grid[i + 1]] + self.rates[s + 1:], self.orders)))
            rows = self.scorer.score([c for _, c in moves], self.step, "descend")
            # Highest top-1, then lower GMACs, then the earlier block (max keeps the first of equals).
            j = max(range(len(moves)), key=lambda m: (rows[m]["top1"], -rows[m]["gmacs"], -m))
            s, self.current, self.best = moves[j][0], moves[j][1], rows[j]
            self.rates[s] = grid[grid.index(self.rates[s]) + 1]

    def choose_orders(self) -> None:
        """Rule 3: block by block, another order only where it scores a higher top-1."""
        for s, k in enumerate(self.rates):
            if k >= 1.0 or len(self.sweep.orders) < 2:  # a block that prunes nothing reads no order
                continue
            self.step += 1
            tries = [(a, self._config(self.rates, self.orders[:s] + [a] + self.orders[s + 1:]))
                     for a in self.sweep.orders if a != self.orders[s]]
            rows = self.scorer.score([c for _, c in tries], self.step, "order")
            j = max(range(len(tries)), key=lambda m: (rows[m]["top1"], -m))
            if rows[j]["top1"] > self.best["top1"] and rows[j]["gmacs"] <= self.budget:
                self.orders[s], self.current, self.best = tries[j][0], tries[j][1], rows[j]


def per_block_sweep(model: nn.Module, calib: EvalData, sweep: PerBlockSweepConfig = PerBlockSweepConfig(),
                    evaluation: Optional[EvalData] = None, progress: bool = True,
                    evaluate_fn: Optional[Callable[..., dict]] = None) -> PerBlockResult:
    """Choose a keep rate and a Rényi order per pruning block by the greedy rule
    (``docs/architecture-experiments.md``, "per_block_sweep"); refuses a model that cannot prune and a budget
    below what the grid's smallest κ reaches.

    Args:
        model: unpruned (left so).
        calib: the held-out calibration images the choice is made on.
        evaluation: images to report the uniform and the chosen config on (never used to choose);
            ``None``: no final rows.
        evaluate_fn: the runner's evaluation (:func:`eamvit.methods.evaluate.evaluate` by default).
    """
    unprune_(model)
    uniform = sweep.uniform()
    stages = len(prune_(model, uniform).blocks)  # the pruning blocks; a bad model or config fails here
    unprune_(model)
    budget, smallest = round(pruned_gflops(model, uniform), 4), sweep.grid[-1]
    if round(pruned_gflops(model, sweep.config((smallest,) * stages, (sweep.orders[0],) * stages)), 4) > budget:
        raise EamError(f"the keep-rate grid's smallest κ {smallest:g} in every block costs more than the budget "
                       f"({budget} GMACs, uniform κ {uniform.keep_rate:g}); add smaller keep rates or raise the "
                       "budget's keep rate")
    search = _Search(sweep, _Scorer(model, calib, "calibration", progress, evaluate_fn), stages, budget)
    search.descend()
    search.choose_orders()
    base = search.scorer.score([uniform], search.step + 1, "uniform")[0]  # rule 4
    chosen = uniform if base["top1"] > search.best["top1"] else search.current
    rows = list(search.scorer.rows)
    if evaluation is not None:
        final = _Scorer(model, evaluation, "evaluation", progress, evaluate_fn)
        for c in dict.fromkeys([uniform, chosen]):
            final.score([c], search.step + 2, "final")[0].fields["chosen"] = c == chosen
        rows += final.rows
    return PerBlockResult(config=chosen, uniform=uniform, budget_gmacs=budget, rows=rows)


SEARCH_COLUMNS = [Column("search_step", "step"), Column("search_phase", "phase"), Column("scored_on", "images"),
                  Column("prune", "method"), Column("keep_rate", "κ per block"), Column("alpha", "α per block"),
                  Column("tokens", "patch tokens per stage"), Column("top1", "top-1 (%)", ".2f"),
                  Column("gmacs", "GMACs", ".4f"), Column("chosen", "chosen")]
