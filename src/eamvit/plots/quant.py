"""Figures of the quantization part of the EAM paper: KL divergence per head (Fig. 4a), CLS-row
divergence maps (Fig. 4b-c) and top-1 against sparsity on the quantized model (Fig. 5/6)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

from eamvit.errors import EamError
from eamvit.methods.kl import KLMaps
from eamvit.plots.entropy import finish_sweep, plt, save_figure, std_band, tau_series

# τ-independent references: FP dotted on top; RepQ-ViT a broad band underneath, visible around curves on it.
_REFERENCE = {"fp": dict(color="k", linestyle=":", linewidth=1.5, zorder=4),
              "repq": dict(color="0.55", linestyle="-", linewidth=7, alpha=0.45, zorder=2, solid_capstyle="butt")}


def plot_kl_per_head(kl: KLMaps, path: str | os.PathLike, title: str = ""):
    """Fig. 4a: mean and max KL divergence of every head, layer by layer (one line per head, one colour
    per head in both panels, one legend outside them)."""
    mean, mx = kl.per_head()
    layers = list(range(mean.shape[0]))  # numbered from 0, as every eamvit option and figure
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, stat, name in ((axes[0], mean, "mean"), (axes[1], mx, "max")):
        for h in range(stat.shape[1]):
            ax.plot(layers, stat[:, h].numpy(), marker="o", markersize=3, color=f"C{h}", label=f"head {h}")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{name} over entries of D_KL(p_fp32 ‖ p_q) (bits)")
        ax.set_title(f"{name} per head", fontsize=10)
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(title or f"D_KL(p_fp32 ‖ p_q) per head (M={kl.meta.get('num_images')}, eps={kl.meta.get('eps')})")
    return save_figure(fig, path)


def plot_kl_cls(kl: KLMaps, layer: int, path: str | os.PathLike, heads: Optional[Sequence[int]] = None):
    """Fig. 4b-c: KL divergence of the CLS token's attention to each patch, one panel per head."""
    grid = kl.cls_rows(layer)
    if grid is None:
        raise EamError("CLS-row divergence maps need a model with a class token (ViT/DeiT)")
    heads = list(heads) if heads is not None else list(range(grid.shape[0]))
    vmax = float(grid.max()) or 1.0
    fig, axes = plt.subplots(1, len(heads), figsize=(2.4 * len(heads) + 1.2, 2.9), squeeze=False,
                             layout="constrained")
    im = None
    for ax, h in zip(axes[0], heads):
        im = ax.imshow(grid[h].numpy(), cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"layer {layer}, head {h}", fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="D_KL (bits)")
    fig.suptitle(f"CLS-token divergence maps, layer {layer}")
    return save_figure(fig, path)


def _series_key(r: dict) -> tuple:
    return (r["quant"], r.get("selection") or "", r.get("maps") or "", r.get("value_bits") or "")


def _series_name(k: tuple) -> str:
    quant, selection, maps, value_bits = k
    values = "fp32" if value_bits == 32 else f"{value_bits}-bit"
    if not selection:
        return "full precision" if quant == "fp" else "RepQ-ViT"
    if selection == "random":
        return f"random freezing ({values} values)"
    return f"EAM, maps from {'quantized' if maps == 'quant' else 'FP'} model, {values} values"


def plot_quant_sweep(rows: Sequence[dict], path: str | os.PathLike, title: str = ""):
    """Fig. 5/6: top-1 against τ for FP and RepQ-ViT (references: see docs/architecture-core.md), the EAM
    variants and random freezing (±1 std band)."""
    fig, ax = plt.subplots(figsize=(9.2, 5.4))
    for k, pts, x, y in tau_series(rows, _series_key):
        if not k[1]:  # no selection: the FP or RepQ-ViT reference
            ax.plot(x, y, label=f"{_series_name(k)} ({y[0]:.2f} %)", **_REFERENCE[k[0]])
            continue
        line, = ax.plot(x, y, linestyle="-" if k[1] == "entropy" else "--", marker="o", markersize=3, zorder=3,
                        label=_series_name(k))
        if k[1] == "random":
            std_band(ax, line, x, y, pts)
    return finish_sweep(fig, ax, path, title or "EAM on the RepQ-ViT model")
