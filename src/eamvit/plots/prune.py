"""Figures of token pruning: top-1 against GFLOPs, kept patches per stage over the image (the seed's
Fig. 4) and per-block attention-entropy histograms for several Rényi orders (Fig. 5). PNGs are
written atomically."""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from eamvit.errors import EamError  # noqa: E402
from eamvit.plots.entropy import save_figure  # noqa: E402
from eamvit.methods.prune import (PruneConfig, kept_masks, prune_, row_label, token_entropies,  # noqa: E402
                    unprune_)


def plot_top1_vs_gflops(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Top-1 against GFLOPs, one line per method over κ; the unpruned model as a star.

    Args:
        rows: rows of :func:`eamvit.prune.prune_sweep`.
        path: PNG to write.
        title: figure title.
    """
    if not rows:
        raise EamError("no sweep rows to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    # Tiny models (the digits demo) cost a few MFLOPs: show those rather than crowded 0.00x labels.
    scale, unit = (1e3, "MFLOPs") if max(r["gflops"] for r in rows) < 0.1 else (1.0, "GFLOPs")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(row_label(r), []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["gflops"])
        if name == "unpruned":
            ax.scatter([scale * r["gflops"] for r in rs], [r["top1"] for r in rs], marker="*", s=160, color="k",
                       zorder=5, label=name)
            continue
        style = dict(linestyle="--", color="0.5") if name == "random" else {}
        ax.plot([scale * r["gflops"] for r in rs], [r["top1"] for r in rs], marker="o", label=name, **style)
        for r in rs:
            ax.annotate(f"{r['keep_rate']:g}", (scale * r["gflops"], r["top1"]), fontsize=6, alpha=0.6,
                        xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(f"{unit} per image (multiply-adds)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Token pruning: accuracy against computation (labels: keep rate κ)")
    save_figure(fig, path)


def _denormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image * s + m).clamp(0, 1)


@torch.no_grad()
def plot_kept_patches(model: nn.Module, image: torch.Tensor, configs: Sequence[PruneConfig], path: str | os.PathLike,
                      mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                      title: str = "") -> None:
    """The seed's Fig. 4: for each config (a row), the patches still present after each stage.

    Dropped patches are washed out in pale blue; the fused token (EViT) has no place on the grid. The model is
    left unpruned.

    Args:
        model: a timm ViT/DeiT at its own image size.
        image: one preprocessed image ``(C, H, W)``.
        configs: pruning configurations (methods) to compare.
        path: PNG to write.
        mean: normalisation mean (the model's data config by default).
        std: normalisation std.
        title: figure title.
    """
    from eamvit.methods.models import data_config, patch_grid

    if image.dim() != 3:
        raise EamError(f"give one image (C, H, W), not a tensor of shape {tuple(image.shape)}")
    cfg = data_config(model)
    mean = cfg["mean"] if mean is None else mean
    std = cfg["std"] if std is None else std
    shown = _denormalise(image.detach().cpu().float(), mean, std)
    C, H, W = shown.shape
    gh, gw = patch_grid(model)
    ph, pw = H // gh, W // gw
    results = []
    try:
        for c in configs:
            prune_(model, c)
            model(image.unsqueeze(0).to(next(model.parameters()).device))
            results.append((c, [m[0].cpu() for m in kept_masks(model)]))
    finally:
        unprune_(model)
    stages = len(results[0][1]) if results else 0
    fig, axes = plt.subplots(len(results), stages + 1, figsize=(2.2 * (stages + 1), 2.3 * len(results)),
                             squeeze=False)
    # Grayscale images are drawn in RGB so that dropped patches (washed out in pale blue) stand apart.
    rgb = shown.permute(1, 2, 0) if C == 3 else shown[0].unsqueeze(-1).expand(-1, -1, 3)
    wash = 0.3 * rgb + 0.7 * torch.tensor([0.72, 0.82, 0.95])
    for row, (c, masks) in enumerate(results):
        axes[row][0].imshow(rgb.numpy())
        axes[row][0].set_ylabel(c.label, fontsize=9)
        axes[row][0].set_title("input" if row == 0 else "", fontsize=9)
        for s, m in enumerate(masks):
            keep = m.repeat_interleave(ph, 0).repeat_interleave(pw, 1)[:H, :W]
            img = torch.where(keep.unsqueeze(-1), rgb, wash).numpy()
            ax = axes[row][s + 1]
            ax.imshow(img)
            blocks = c.blocks if c.blocks is not None else None
            ax.set_title(f"stage {s + 1}: {int(m.sum())} kept" + (f" (block {blocks[s]})" if blocks else ""),
                         fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    kr = sorted({c.keep_rate for c in configs})
    fig.suptitle(title or f"Kept patches per pruning stage (κ = {', '.join(f'{k:g}' for k in kr)})")
    save_figure(fig, path)


def plot_entropy_histograms(model: nn.Module, images: torch.Tensor, path: str | os.PathLike,
                            alphas: Sequence[float] = (1.0, 2.0, 3.0, math.inf), layers: Optional[Sequence[int]] = None,
                            bins: int = 40, keys: str = "all", title: str = "") -> None:
    """The seed's Fig. 5: per block, the distribution of patch tokens' attention entropy for each α.

    Args:
        model: a timm ViT/DeiT (unpruned: every block sees every patch).
        images: a batch ``(B, C, H, W)``.
        path: PNG to write.
        alphas: Rényi orders (1 = Shannon, ``math.inf`` = min-entropy).
        layers: blocks to show (all by default).
        bins: histogram bins (shared edges across α within a block).
        keys: ``"all"`` or ``"patches"``.
        title: figure title.
    """
    ent = token_entropies(model, images, alphas, layers, keys)
    n = len(next(iter(ent.values())))
    shown = list(layers) if layers is not None else list(range(n))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= n:
            ax.axis("off")
            continue
        lo = min(float(e[i].min()) for e in ent.values())
        hi = max(float(e[i].max()) for e in ent.values())
        edges = torch.linspace(lo, hi if hi > lo else lo + 1e-3, bins + 1).numpy()
        for a, e in ent.items():
            name = "Shannon" if a == 1.0 else f"α={'∞' if math.isinf(a) else f'{a:g}'}"
            ax.hist(e[i].numpy(), bins=edges, histtype="step", density=True, label=name)
        ax.set_title(f"block {shown[i] + 1}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("attention entropy of a patch token (nats, mean over heads)", fontsize=9)
    fig.suptitle(title or f"Attention-entropy distributions per block ({images.shape[0]} images)")
    save_figure(fig, path)
