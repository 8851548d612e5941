"""Exact Pareto frontier of per-layer choices with additive size and cost (PMQ's bit allocation)."""
from __future__ import annotations

from typing import Sequence

from eamvit.errors import EamError

Point = tuple[float, float, tuple[int, ...]]


def _rebuild(levels: list[list[tuple[float, float, int, int]]]) -> list[Point]:
    out = []
    for k, (s, c, _, _) in enumerate(levels[-1]):
        choice, idx = [], k
        for lvl in range(len(levels) - 1, 0, -1):
            _, _, parent, ci = levels[lvl][idx]
            choice.append(ci)
            idx = parent
        out.append((s, c, tuple(reversed(choice))))
    return out


def pareto_frontier(options: Sequence[Sequence[tuple[float, float]]]) -> list[Point]:
    """``(total size, total cost, choice index per layer)`` of every non-dominated configuration, by
    increasing size (strictly decreasing cost; ties keep the first found), from per-layer options
    ``(size, cost)``."""
    if not options or any(len(o) == 0 for o in options):
        raise EamError("the Pareto search needs at least one choice per layer")
    # Levels of (size, cost, parent index, choice) so configurations are rebuilt at the end only.
    levels: list[list[tuple[float, float, int, int]]] = [[(0.0, 0.0, -1, -1)]]
    for opts in options:
        cands = [(s + os_, c + oc, pi, ci) for pi, (s, c, _, _) in enumerate(levels[-1])
                 for ci, (os_, oc) in enumerate(opts)]
        cands.sort(key=lambda t: (t[0], t[1]))
        kept: list[tuple[float, float, int, int]] = []
        for t in cands:
            if not kept or t[1] < kept[-1][1]:
                kept.append(t)
        levels.append(kept)
    return _rebuild(levels)


def choose(frontier: Sequence[Point], budget: float) -> Point:
    """The frontier point with the lowest cost whose size is within ``budget``."""
    ok = [p for p in frontier if p[0] <= budget * (1 + 1e-12)]
    if not ok:
        raise EamError(f"no bit configuration fits the size budget {budget:.6g}; the smallest needs "
                       f"{min(p[0] for p in frontier):.6g}: raise the budget or allow fewer bits")
    return min(ok, key=lambda p: (p[1], p[0]))


def front_mask(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which points ``(a, b)`` (e.g. top-1, speed-up) no other point dominates when both are maximised;
    equal points do not dominate each other, so both stay on the front."""
    # Sweep by decreasing a (ties: larger b first): a point is on the front iff its b beats every b
    # seen at a strictly larger a, or equals the best b among points with the same a.
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    on = [False] * len(points)
    best_above = float("-inf")  # the largest b among points with a strictly larger a
    k = 0
    while k < len(order):
        a = points[order[k]][0]
        group = [i for i in order[k:] if points[i][0] == a]
        top = points[group[0]][1]
        for i in group:
            on[i] = points[i][1] == top and top > best_above
        best_above = max(best_above, top)
        k += len(group)
    return on
