"""The one timer: wall-clock timing of calls, warmed up, repeated and alternated so that the machine's drift
cancels in per-repetition ratios. Design: ``docs/architecture-experiments.md``, "timer".
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from eamvit.errors import EamError


@dataclass(frozen=True)
class Stats:
    """Median, quartiles (``p25``, ``p75``), range and count of repeated measurements."""

    median: float
    p25: float
    p75: float
    min: float
    max: float
    n: int

    @property
    def spread(self) -> float:
        """``(max − min) / median``."""
        return (self.max - self.min) / self.median if self.median else 0.0

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stats":
        """The statistics of ``values`` (one value: all of them equal to it)."""
        if not values:
            raise EamError("no measurements to summarise")
        vals = list(values)
        q1, med, q3 = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else vals * 3
        return cls(median=med, p25=q1, p75=q3, min=min(vals), max=max(vals), n=len(vals))


def time_calls(calls: Sequence[Callable[[], Any]], warmup: int = 2, reps: int = 7,
               sync: Optional[Callable[[], None]] = None) -> list[list[float]]:
    """``times[i][r]``: seconds of ``calls[i]`` in repetition ``r``, after ``warmup`` untimed rounds of all calls.

    Args:
        calls: the calls to time; each runs once per repetition, the first one rotating.
        sync: run after each call, inside its time (e.g. ``torch.cuda.synchronize``).
    """
    if not calls or reps < 1 or warmup < 0:
        raise EamError(f"timing needs at least one call, reps ≥ 1 and warmup ≥ 0, got {len(calls)} calls, "
                       f"reps {reps}, warmup {warmup}")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for call in calls:
            call()
    sync()
    times: list[list[float]] = [[] for _ in calls]
    for r in range(reps):
        for j in range(len(calls)):
            i = (r + j) % len(calls)
            t0 = time.perf_counter()
            calls[i]()
            sync()
            times[i].append(time.perf_counter() - t0)
    return times


def ratio_stats(reference: Sequence[float], times: Sequence[float]) -> Stats:
    """:class:`Stats` of the per-repetition speed-ups ``reference[r] / times[r]``."""
    if len(reference) != len(times):
        raise EamError(f"speed-ups need paired repetitions, got {len(reference)} and {len(times)}")
    return Stats.of([a / b for a, b in zip(reference, times)])
