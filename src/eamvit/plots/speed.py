"""Top-1 against measured speed-up: frozen attention next to token pruning (data in, PNG out)."""
from __future__ import annotations

import os
from typing import Any, Sequence

from eamvit.plots.entropy import plt, save_figure

_MARKERS = "osD^v<>pXh"


def _methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for r in rows:
        if r["method"] not in out:
            out.append(r["method"])
    return out


def plot_top1_vs_speedup(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = ""):
    """One line per method through its points ``(speed-up, top-1)`` in the given order, with the speed-up's spread.

    Freezing methods are solid lines, everything else (token pruning) dashed; the unmodified model
    is a black star at speed-up 1, and a dotted line marks speed-up 1 (no gain).

    Args:
        rows: dicts with ``method`` (the line's label; ``"unmodified"`` is the reference point),
            ``speedup`` (measured images/s ÷ the unmodified model's), optional ``speedup_lo`` /
            ``speedup_hi`` (its interquartile range), ``top1`` and an optional ``point`` label (τ or κ)
            written next to the marker.
        path: PNG to write.
        title: figure title.

    Returns:
        The figure (closed).
    """
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for i, m in enumerate(x for x in _methods(rows) if x != "unmodified"):
        pts = [r for r in rows if r["method"] == m]  # in sweep order (τ up, κ down): the line follows the knob
        x = [r["speedup"] for r in pts]
        y = [r["top1"] for r in pts]
        err = [[r["speedup"] - r.get("speedup_lo", r["speedup"]) for r in pts],
               [r.get("speedup_hi", r["speedup"]) - r["speedup"] for r in pts]]
        style = "-" if m.startswith("freeze") else "--"
        ax.errorbar(x, y, xerr=err, fmt=style + _MARKERS[i % len(_MARKERS)], ms=5, capsize=2, lw=1.3, label=m)
        for r in pts:
            if r.get("point"):
                ax.annotate(str(r["point"]), (r["speedup"], r["top1"]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points", color="0.3")
    for r in rows:
        if r["method"] == "unmodified":
            ax.plot([r["speedup"]], [r["top1"]], "k*", ms=12, label="unmodified", zorder=5)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("measured speed-up: median of per-forward time ratios to an unmodified copy timed alternately\n"
                  "(bars: interquartile range of the repetitions)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "Top-1 against measured speed-up: frozen attention vs token pruning")
    return save_figure(fig, path)
