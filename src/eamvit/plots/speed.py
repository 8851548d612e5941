"""Top-1 against measured speed-up: frozen attention next to token pruning and merging (data in, PNG out)."""
from __future__ import annotations

import os
from typing import Any, Sequence

from matplotlib.lines import Line2D

from eamvit.plots.entropy import plt, save_figure

_MARKERS = "osD^vPXphd"  # no "<" or ">": those end a cut bar
CUT = "bar cut at the axis edge"  # the legend entry of the arrow that ends a clipped bar


def _knobs(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """One marker shape per point label (τ or κ value), in order of first appearance."""
    labels = dict.fromkeys(str(r["point"]) for r in rows if r.get("point"))
    return {p: _MARKERS[i % len(_MARKERS)] for i, p in enumerate(labels)}


def _x_range(rows: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """The x range of the medians and of speed-up 1, padded; interquartile bars do not widen it, so
    one noisy repetition cannot squeeze every point into a corner."""
    xs = [float(r["speedup"]) for r in rows] + [1.0]
    lo, hi = min(xs), max(xs)
    pad = max(0.04, 0.1 * (hi - lo))
    return lo - pad, hi + pad


def _bar(ax, r: dict[str, Any], colour, xlim: tuple[float, float]) -> bool:
    """The interquartile bar of one point, cut at ``xlim`` with an arrow; True if it was cut."""
    lo, hi = r.get("speedup_lo", r["speedup"]), r.get("speedup_hi", r["speedup"])
    a, b = max(lo, xlim[0]), min(hi, xlim[1])
    # Bars lighter than the points: on a loaded machine they are wide and would hide the medians.
    ax.hlines(r["top1"], a, b, color=colour, lw=1.0, alpha=0.6, zorder=3)
    for end, cut, tip in ((a, lo < xlim[0], "<"), (b, hi > xlim[1], ">")):
        ax.plot([end], [r["top1"]], marker=tip if cut else "|", color=colour, ms=6 if cut else 5,
                alpha=1.0 if cut else 0.6, linestyle="", zorder=3, clip_on=False)
    return lo < xlim[0] or hi > xlim[1]


def plot_top1_vs_speedup(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = ""):
    """One line per ``method`` through its points ``(speedup, top1)`` in the given order, with the
    interquartile ``speedup_lo``/``speedup_hi`` and a marker per ``point`` label (τ or κ); ``"unmodified"``
    is the reference (see docs/architecture-core.md)."""
    fig, ax = plt.subplots(figsize=(10.5, 5.6), layout="constrained")
    xlim, shapes = _x_range(rows), _knobs(rows)
    handles, cut = [], False
    for i, m in enumerate(x for x in dict.fromkeys(r["method"] for r in rows) if x != "unmodified"):
        pts = [r for r in rows if r["method"] == m]  # in sweep order (τ up, κ down): the line follows the knob
        line, = ax.plot([r["speedup"] for r in pts], [r["top1"] for r in pts], color=f"C{i}",
                        linestyle="-" if m.startswith("freeze") else "-." if m.startswith("merge") else "--",
                        lw=1.3, zorder=3)
        for r in pts:
            cut = _bar(ax, r, line.get_color(), xlim) or cut
            ax.plot([r["speedup"]], [r["top1"]], marker=shapes.get(str(r.get("point")), "o"), ms=7, linestyle="",
                    color=line.get_color(), markeredgecolor="white", markeredgewidth=0.8, zorder=4)
        handles.append(Line2D([], [], color=line.get_color(), linestyle=line.get_linestyle(), label=m))
    for r in rows:
        if r["method"] == "unmodified":
            ax.plot([r["speedup"]], [r["top1"]], marker="*", ms=16, markerfacecolor="none", markeredgecolor="k",
                    linestyle="", zorder=2)
            ax.axhline(r["top1"], color="grey", lw=0.8, ls=":", zorder=1)
            handles.append(Line2D([], [], marker="*", ms=12, markerfacecolor="none", markeredgecolor="k",
                                  linestyle="", label=f"unmodified ({r['top1']:.2f} %)"))
    ax.axvline(1.0, color="grey", lw=0.8, ls=":", zorder=1)
    handles += [Line2D([], [], marker=s, color="0.35", linestyle="", label=p) for p, s in shapes.items()]
    if cut:
        handles.append(Line2D([], [], marker=">", color="0.35", linestyle="", label=CUT))
    ax.set_xlim(*xlim)
    ax.set_xlabel("measured speed-up: median of per-forward time ratios to an unmodified copy timed alternately\n"
                  "(bars: interquartile range of the repetitions)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(title or "Top-1 against measured speed-up: frozen attention vs token pruning")
    return save_figure(fig, path)
