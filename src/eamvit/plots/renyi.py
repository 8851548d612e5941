"""Figures of the Rényi attention-entropy pruning paper (seed 002) from saved entropy maps: entropy
against mean attention distance per head (its Fig. 6) and per-token Rényi entropy distributions (Fig. 5)."""
from __future__ import annotations

import math
import os

import torch

from eamvit.errors import EamError
from eamvit.methods.calibrate import EntropyMaps
from eamvit.ops.attention_stats import format_order, grid_distances
from eamvit.plots.entropy import plt, save_figure

# Merged bins across the populated entropy range of the histogram figure: smooth, yet shows the shape.
PLOT_BINS = 40


def _measured(maps: EntropyMaps, kind: str, option: str) -> list[int]:
    values = getattr(maps, kind)
    layers = [l for l in range(maps.num_layers) if values is not None and values[l] is not None]
    if not layers:
        raise EamError(f"these maps hold no {kind.replace('_', ' ')}; compute them with `eamvit calibrate {option}`")
    return layers


def _images(maps: EntropyMaps) -> str:
    return f"M={maps.meta.get('num_images')} images"


def order_label(alpha: float) -> str:
    """``α = 2``, with the name of the orders that have one (0 Hartley, 1 Shannon, ∞ min-entropy)."""
    names = {0.0: " (Hartley)", 1.0: " (Shannon)", math.inf: " (min-entropy)"}
    return f"α = {'∞' if math.isinf(alpha) else format_order(alpha)}{names.get(alpha, '')}"


def plot_entropy_distance(maps: EntropyMaps, path: str | os.PathLike):
    """Fig. 6: mean attention entropy against mean attention distance, one point per (layer, head),
    coloured by layer; a star marks uniform attention (the largest entropy and its distance)."""
    layers = _measured(maps, "distance", "--distance")
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8.6, 5.6), layout="constrained")
    for i, l in enumerate(layers):
        colour = cmap(i / max(len(layers) - 1, 1))
        ax.scatter(maps.distance[l].numpy(), maps.head_entropy[l].numpy(), s=46, color=colour,
                   edgecolors="k", linewidths=0.4, label=f"layer {l}", zorder=3)
    grid = maps.meta.get("grid")
    uniform = sorted({maps.entropy[l].shape[-1] for l in layers})
    for n in uniform if grid else []:
        # Uniform attention: entropy log N, distance the mean over all pairs of patches.
        d = float(grid_distances(tuple(grid), dtype=torch.float64).mean())
        ax.scatter([d], [math.log(n)], marker="*", s=220, color="0.55", edgecolors="k", linewidths=0.5, zorder=2,
                   label=f"uniform attention\n({n} tokens)")
    ax.set_xlabel("mean attention distance (patches of the"
                  + (f" {grid[0]}x{grid[1]} grid)" if grid else " grid)"))
    ax.set_ylabel("mean attention entropy of a patch's row (nats)")
    ax.set_title(f"{maps.meta.get('model', {}).get('name', 'model')}: attention entropy against attention distance, "
                 f"one point per head ({_images(maps)})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), ncols=1 + (len(layers) + 1) // 14,
              title="layer (0-based)", title_fontsize=8)
    return save_figure(fig, path)


def _populated(maps: EntropyMaps, layers: list[int]) -> tuple[float, float]:
    """The entropy range (nats) of the non-empty bins of every layer and order (one x range for all panels)."""
    lo, hi = math.inf, -math.inf
    for l in layers:
        counts = maps.renyi[l]
        width = math.log(maps.entropy[l].shape[-1]) / counts.shape[-1]
        full = (counts.sum(0) > 0).nonzero().flatten()
        if full.numel():
            lo, hi = min(lo, float(full[0]) * width), max(hi, float(full[-1] + 1) * width)
    if not math.isfinite(lo):
        raise EamError("the Rényi entropy histograms of these maps are empty (no image was seen)")
    return lo, hi


def _merged(counts: torch.Tensor, top: float, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edges, counts)`` of ``counts`` ``(orders, bins)`` on ``[0, top]`` with adjacent bins merged: as
    many as the largest divisor of the bin count up to ``target``, so every merged bin is equally wide."""
    bins = counts.shape[-1]
    factor = max(d for d in range(1, max(1, min(target, bins)) + 1) if bins % d == 0)
    merged = counts.double().view(counts.shape[0], -1, factor).sum(-1)
    width = top / bins * factor
    return torch.arange(merged.shape[-1] + 1, dtype=torch.float64) * width, merged


def plot_renyi_histograms(maps: EntropyMaps, path: str | os.PathLike):
    """Fig. 5: the distribution of the per-token Rényi entropies (the scores token pruning ranks), one
    panel per layer, one curve per order α, as a density over one shared entropy range."""
    layers = _measured(maps, "renyi", "--renyi-orders")
    orders = maps.renyi_orders
    lo, hi = _populated(maps, layers)
    cols = min(4, math.ceil(math.sqrt(len(layers))))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 0.6, 2.6 * rows + 1.0), squeeze=False, sharex=True,
                             layout="constrained")
    cmap = plt.get_cmap("plasma")
    for ax, l in zip(axes.flat, layers):
        top = math.log(maps.entropy[l].shape[-1])
        width = top / maps.renyi[l].shape[-1]
        edges, counts = _merged(maps.renyi[l], top, round((hi - lo) / width / PLOT_BINS))
        step = float(edges[1] - edges[0])
        for i, alpha in enumerate(orders):
            total = float(counts[i].sum())
            ax.stairs((counts[i] / max(total, 1.0) / step).numpy(), edges.numpy(), linewidth=1.6,
                      color=cmap(0.85 * i / max(len(orders) - 1, 1)), label=order_label(alpha))
        if lo <= top <= hi + width:
            ax.axvline(top, color="0.4", linestyle=":", linewidth=1.2, label="uniform attention (log N)")
        ax.set_title(f"layer {l}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    pad = 0.03 * (hi - lo) or 0.05
    axes.flat[0].set_xlim(lo - pad, hi + pad)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("density (1/nat)", fontsize=9)
    for c in range(cols):  # the bottom panel of a column that lost its last row carries the label
        visible = [axes[r, c] for r in range(rows) if axes[r, c].get_visible()]
        visible[-1].set_xlabel("per-token entropy (nats)", fontsize=9)
        visible[-1].tick_params(labelbottom=True)
    legend = {}
    for ax in axes.flat[:len(layers)]:  # every order once, and the uniform line where a panel has it
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=min(len(legend), 3), fontsize=9,
               title="Rényi order α of the per-token entropy")
    fig.suptitle(f"Per-token Rényi attention entropy per layer (patch tokens, mean over heads, {_images(maps)})",
                 fontsize=10)
    return save_figure(fig, path)
