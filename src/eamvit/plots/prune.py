"""Figures of token pruning: top-1 against GFLOPs, kept patches per stage over the image (the seed's
Fig. 4) and per-block attention-entropy histograms for several Rényi orders (Fig. 5). Data in, PNG
out: the data come from :func:`eamvit.methods.prune.kept_patch_masks` and
:func:`eamvit.methods.prune.token_entropies`. PNGs are written atomically."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from eamvit.errors import EamError  # noqa: E402
from eamvit.experiments.prune_sweep import row_label  # noqa: E402
from eamvit.plots.entropy import save_figure  # noqa: E402

DROPPED_RGB = (0.72, 0.82, 0.95)  # dropped patches are washed out towards this pale blue


_KAPPA_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def plot_top1_vs_gflops(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = ""):
    """Top-1 against GFLOPs: one colour per method, one marker shape per keep rate κ; unpruned as a star.

    GFLOPs are the unit of the sweep's tables too (tiny models get a x10^k factor on the axis, not
    another unit). κ is told by the marker, explained in the legend, rather than by a text at each
    point: methods at one κ cost about the same, so such labels pile up.

    Args:
        rows: rows of :func:`eamvit.experiments.prune_sweep.prune_sweep`.
        path: PNG to write.
        title: figure title.

    Returns:
        The (closed) matplotlib figure.
    """
    from matplotlib.lines import Line2D

    if not rows:
        raise EamError("no sweep rows to plot")
    kappas = sorted({float(r["keep_rate"]) for r in rows if r["method"] != "none"}, reverse=True)
    if len(kappas) > len(_KAPPA_MARKERS):
        raise EamError(f"the figure tells at most {len(_KAPPA_MARKERS)} keep rates apart, got {len(kappas)}")
    marker = dict(zip(kappas, _KAPPA_MARKERS))
    fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(row_label(r), []).append(r)
    methods = []
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["gflops"])
        if name == "unpruned":
            ax.scatter([r["gflops"] for r in rs], [r["top1"] for r in rs], marker="*", s=160, color="k", zorder=5)
            methods.append(Line2D([], [], marker="*", markersize=11, color="k", linestyle="", label=name))
            continue
        style = dict(linestyle="--", color="0.5") if name == "random" else {}
        line, = ax.plot([r["gflops"] for r in rs], [r["top1"] for r in rs], **style)
        for r in rs:
            ax.plot(r["gflops"], r["top1"], marker=marker[float(r["keep_rate"])], color=line.get_color(), zorder=4)
        methods.append(Line2D([], [], color=line.get_color(), linestyle=line.get_linestyle(), label=name))
    shapes = [Line2D([], [], marker=marker[k], color="k", linestyle="", label=f"κ = {k:g}") for k in kappas]
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3), useMathText=True)
    ax.set_xlabel("GFLOPs per image (multiply-adds)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(handles=methods + shapes, fontsize=8, ncol=2)
    ax.set_title(title or "Token pruning: accuracy against computation", fontsize=10)
    return save_figure(fig, path)


def _denormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image * s + m).clamp(0, 1)


def plot_kept_patches(image: torch.Tensor, masks: Mapping[str, Sequence[torch.Tensor]], path: str | os.PathLike,
                      mean: Sequence[float], std: Sequence[float], title: str = "",
                      blocks: Optional[Sequence[int]] = None):
    """The seed's Fig. 4: for each method (a row), the patches still present after each stage.

    Dropped patches are washed out in pale blue (a legend says so); the fused token (EViT) has no
    place on the grid.

    Args:
        image: the preprocessed image ``(C, H, W)`` the masks belong to.
        masks: ``{row label: [per stage, (gh, gw) booleans]}`` from
            :func:`eamvit.methods.prune.kept_patch_masks`.
        path: PNG to write.
        mean: normalisation mean of ``image`` (undone for display).
        std: normalisation std.
        title: figure title.
        blocks: 0-based pruning blocks, shown as such in the stage titles (as --prune-blocks).
    """
    if image.dim() != 3 or not masks:
        raise EamError("give one image (C, H, W) and at least one row of kept-patch masks")
    shown = _denormalise(image.detach().cpu().float(), mean, std)
    C, H, W = shown.shape
    stages = max(len(m) for m in masks.values())
    fig, axes = plt.subplots(len(masks), stages + 1, figsize=(2.2 * (stages + 1), 2.3 * len(masks) + 0.5),
                             squeeze=False)
    # Grayscale images are drawn in RGB so that dropped patches (washed out in pale blue) stand apart.
    rgb = shown.permute(1, 2, 0) if C == 3 else shown[0].unsqueeze(-1).expand(-1, -1, 3)
    wash = 0.3 * rgb + 0.7 * torch.tensor(DROPPED_RGB)
    for row, (label, stage_masks) in enumerate(masks.items()):
        axes[row][0].imshow(rgb.numpy())
        axes[row][0].set_ylabel(label, fontsize=9)
        axes[row][0].set_title("input" if row == 0 else "", fontsize=9)
        for s, m in enumerate(stage_masks):
            ph, pw = H // m.shape[0], W // m.shape[1]
            keep = m.repeat_interleave(ph, 0).repeat_interleave(pw, 1)[:H, :W]
            ax = axes[row][s + 1]
            ax.imshow(torch.where(keep.unsqueeze(-1), rgb, wash).numpy())
            where = f" (after block {blocks[s]})" if blocks is not None else ""  # 0-based, as --prune-blocks
            ax.set_title(f"stage {s + 1}{where}: {int(m.sum())} kept", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.legend(handles=[Patch(color=DROPPED_RGB, label="dropped patch (washed out in pale blue)")],
               loc="lower center", ncol=1, fontsize=8, frameon=False)
    fig.suptitle(title or "Kept patches per pruning stage")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path)


def plot_entropy_histograms(entropies: Mapping[float, Sequence[torch.Tensor]], path: str | os.PathLike,
                            layers: Optional[Sequence[int]] = None, bins: int = 40, title: str = ""):
    """The seed's Fig. 5: per block, the distribution of patch tokens' attention entropy for each α.

    Args:
        entropies: ``{alpha: [per layer, entropies in nats]}`` from
            :func:`eamvit.methods.prune.token_entropies`; drawn in bits, as every eamvit figure.
        path: PNG to write.
        layers: 0-based blocks the lists hold (titles show them so); ``0..n-1`` by default.
        bins: histogram bins (shared edges across α within a block).
        title: figure title.
    """
    if not entropies:
        raise EamError("no token entropies to plot")
    ent = {a: [e / math.log(2) for e in per] for a, per in entropies.items()}
    n = len(next(iter(ent.values())))
    shown = list(layers) if layers is not None else list(range(n))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.5 * rows + 0.8), squeeze=False)
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
        ax.set_title(f"block {shown[i]}", fontsize=9)  # 0-based, as --prune-blocks
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("density", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("attention entropy of a patch token (bits, mean over heads)", fontsize=9)
    fig.suptitle(title or "Attention-entropy distributions per block")
    fig.tight_layout()
    return save_figure(fig, path)
