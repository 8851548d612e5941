"""Top-1 against measured speed-up: structured freezing next to token pruning (data in, PNG out)."""
from __future__ import annotations

import os
from typing import Any, Sequence

from eamvit.plots.entropy import save_figure


def plot_top1_vs_speedup(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """One line per method, through its points ``(speedup, top1)``, with the speed-up's spread.

    Args:
        rows: dicts with ``method`` (the line's label), ``speedup`` (measured images/s ÷ the
            unmodified model's), optional ``speedup_lo``/``speedup_hi`` (its spread), ``top1`` and an
            optional ``point`` label (τ or κ) written next to the marker.
        path: PNG to write.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    for i, m in enumerate(methods):
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["speedup"])
        x = [r["speedup"] for r in pts]
        y = [r["top1"] for r in pts]
        lo = [r["speedup"] - r.get("speedup_lo", r["speedup"]) for r in pts]
        hi = [r.get("speedup_hi", r["speedup"]) - r["speedup"] for r in pts]
        style = "-o" if i < 10 else "--s"
        ax.errorbar(x, y, xerr=[lo, hi], fmt=style, ms=4, capsize=2, label=m)
        for r in pts:
            if r.get("point") is not None:
                ax.annotate(str(r["point"]), (r["speedup"], r["top1"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("measured speed-up (images/s ÷ unmodified model's; bars: interquartile range of repetitions)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Accuracy against measured speed-up")
    save_figure(fig, path)
