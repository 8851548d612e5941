"""``eamvit optimize``'s figure: top-1 against measured speed-up, the Pareto front drawn (data in, PNG out)."""
from __future__ import annotations

import itertools
import os
from typing import Any, Optional, Sequence

from eamvit.plots.entropy import plt, save_figure

_STAGES = {"reference": ("*", "black"), "single": ("o", "C0"), "stack": ("s", "C1")}


def plot_pareto(rows: Sequence[dict[str, Any]], path: str | os.PathLike, max_drop: Optional[float] = None,
                title: str = ""):
    """``optimize``'s rows (those without a ``top1`` could not be built), each with its interquartile
    speed-up bar, the front as a step line, the ``max_drop`` budget below the first ``reference`` row's
    top-1 as a dotted line, and the chosen point ringed and named."""
    rows = [r for r in rows if r.get("top1") is not None]
    fig, ax = plt.subplots(figsize=(11, 5.6), layout="constrained")
    names = {"reference": "unmodified (timed against itself)", "single": "one technique", "stack": "stacked techniques"}
    for (stage, (marker, colour)), tuned in itertools.product(_STAGES.items(), (False, True)):
        pts = [r for r in rows if r["stage"] == stage and bool(r.get("finetune_epochs")) == tuned]
        if not pts:
            continue
        ax.hlines([r["top1"] for r in pts], [r["speedup_p25"] for r in pts], [r["speedup_p75"] for r in pts],
                  color=colour, lw=1.0, alpha=0.45, zorder=2)
        # Fine-tuned points (`optimize --finetune-epochs`) hollow: the same speed as their untrained twins.
        ax.scatter([r["speedup"] for r in pts], [r["top1"] for r in pts], marker=marker, s=70 if stage == "reference"
                   else 30, zorder=3, label=names[stage] + (", fine-tuned" if tuned else ""),
                   **({"facecolors": "none", "edgecolors": colour, "linewidths": 1.3} if tuned else {"color": colour}))
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["speedup"])
    if front:  # the edge of what the front dominates: between two front points, the faster one's top-1
        ax.step([r["speedup"] for r in front], [r["top1"] for r in front], where="pre", color="C3", lw=1.4,
                zorder=2.5, label="Pareto front")
        ax.scatter([r["speedup"] for r in front], [r["top1"] for r in front], s=90, facecolors="none",
                   edgecolors="C3", lw=1.2, zorder=3.5)
    ref = next((r for r in rows if r["stage"] == "reference"), None)
    if ref is not None and max_drop is not None:
        ax.axhline(ref["top1"] - max_drop, color="grey", ls=":", lw=1.2,
                   label=f"budget: {max_drop:g} point(s) below the unmodified top-1")
    ax.axvline(1.0, color="grey", ls="-", lw=0.6, alpha=0.5)
    for r in rows:
        if r["chosen"]:
            ax.scatter([r["speedup"]], [r["top1"]], s=220, facecolors="none", edgecolors="C2", lw=2, zorder=4,
                       label="chosen: fastest within the budget")
            # To the left and below: the chosen point is usually the fastest, at the right edge.
            ax.annotate(r["label"], (r["speedup"], r["top1"]), textcoords="offset points", xytext=(-10, -16),
                        ha="right", fontsize=9, color="C2")
    ax.set_xlabel("measured speed-up over the unmodified model (median; bars: p25–p75)")
    ax.set_ylabel("top-1 (%) on held-out images")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: it would hide points
    return save_figure(fig, path)
