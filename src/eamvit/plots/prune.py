"""Figures of token pruning: top-1 against GMACs, kept patches per stage over the image (the seed's
Fig. 4) and per-block attention-entropy histograms for several Rényi orders (Fig. 5)."""
from __future__ import annotations

import itertools
import math
import os
from typing import Any, Mapping, Optional, Sequence

import torch
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import ScalarFormatter

from eamvit.errors import EamError
from eamvit.methods.reduce import row_label
from eamvit.plots.entropy import plt, save_figure
from eamvit.plots.renyi import order_label

DROPPED_RGB = (0.55, 0.72, 0.95)  # dropped patches are painted over in this one flat blue
_KAPPA_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _kappa(row: dict[str, Any]) -> float:
    """A row's κ: its keep rate, or for a merging row the κ whose GMACs it matches."""
    return float(row["matched_keep_rate"] if row.get("merge") else row["keep_rate"])


def plot_top1_vs_gmacs(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = ""):
    """Top-1 against GMACs of :func:`eamvit.experiments.prune_sweep.prune_sweep`'s rows: one colour per
    method, one marker shape per keep rate κ (see docs/architecture-core.md); unmodified as a star."""
    if not rows:
        raise EamError("no sweep rows to plot")
    reduced = [r for r in rows if r["prune"] or r.get("merge")]
    kappas = sorted({_kappa(r) for r in reduced}, reverse=True)
    if len(kappas) > len(_KAPPA_MARKERS):
        raise EamError(f"the figure tells at most {len(_KAPPA_MARKERS)} keep rates apart, got {len(kappas)}")
    marker = dict(zip(kappas, _KAPPA_MARKERS))
    fig, ax = plt.subplots(figsize=(8.8, 5.4), layout="constrained")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(row_label(r), []).append(r)
    methods = []
    # tab10 without its grey, which is random's: every other method a colour of its own (nine before repeating)
    colours = iter(c for i, c in enumerate(itertools.cycle(plt.get_cmap("tab10").colors)) if i % 10 != 7)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["gmacs"])
        if not rs[0]["prune"] and not rs[0].get("merge"):
            ax.scatter([r["gmacs"] for r in rs], [r["top1"] for r in rs], marker="*", s=160, color="k", zorder=5)
            methods.append(Line2D([], [], marker="*", markersize=11, color="k", linestyle="", label=name))
            continue
        style = dict(linestyle="--", color="0.5") if name == "random" else (
            dict(linestyle="-.", linewidth=1.8, color=next(colours)) if rs[0].get("merge") else
            dict(color=next(colours)))
        line, = ax.plot([r["gmacs"] for r in rs], [r["top1"] for r in rs], **style)
        for r in rs:
            ax.plot(r["gmacs"], r["top1"], marker=marker[_kappa(r)], color=line.get_color(), zorder=4)
        methods.append(Line2D([], [], color=line.get_color(), linestyle=line.get_linestyle(), label=name))
    shapes = [Line2D([], [], marker=marker[k], color="k", linestyle="", label=f"κ = {k:g}") for k in kappas]
    ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    ax.xaxis.get_major_formatter().set_scientific(False)
    ax.set_xlabel("GMACs per image (multiply-accumulates)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(handles=methods + shapes, fontsize=8, ncol=2)
    merging = any(r.get("merge") for r in rows)
    ax.set_title(title or ("Token pruning and merging (dash-dotted; at κ's GMACs): accuracy against computation"
                           if merging else "Token pruning: accuracy against computation"), fontsize=10)
    return save_figure(fig, path)


def plot_kept_patches(image: torch.Tensor, masks: Mapping[str, Sequence[torch.Tensor]], path: str | os.PathLike,
                      mean: Sequence[float], std: Sequence[float], title: str = "",
                      blocks: Optional[Sequence[int]] = None):
    """The seed's Fig. 4: for each method (a row of :func:`eamvit.methods.prune.kept_patch_masks`), the
    patches of the preprocessed ``image`` (``mean``, ``std``) still present after each stage, dropped ones
    painted one flat blue; ``blocks`` (0-based) name the stages."""
    if image.dim() != 3 or not masks:
        raise EamError("give one image (C, H, W) and at least one row of kept-patch masks")
    shown = image.detach().cpu().float()
    shown = (shown * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)).clamp(0, 1)
    C, H, W = shown.shape
    stages = max(len(m) for m in masks.values())
    fig, axes = plt.subplots(len(masks), stages + 1, figsize=(2.2 * (stages + 1), 2.3 * len(masks) + 0.5),
                             squeeze=False)
    # Grayscale images are drawn in RGB so that dropped patches (flat blue) stand apart.
    rgb = shown.permute(1, 2, 0) if C == 3 else shown[0].unsqueeze(-1).expand(-1, -1, 3)
    dropped = torch.tensor(DROPPED_RGB, dtype=rgb.dtype).expand_as(rgb)
    for row, (label, stage_masks) in enumerate(masks.items()):
        axes[row][0].imshow(rgb.numpy())
        axes[row][0].set_ylabel(label, fontsize=9)
        axes[row][0].set_title("input" if row == 0 else "", fontsize=9)
        for s, m in enumerate(stage_masks):
            ph, pw = H // m.shape[0], W // m.shape[1]
            keep = m.repeat_interleave(ph, 0).repeat_interleave(pw, 1)[:H, :W]
            ax = axes[row][s + 1]
            ax.imshow(torch.where(keep.unsqueeze(-1), rgb, dropped).numpy())
            where = f" (after block {blocks[s]})" if blocks is not None else ""  # 0-based, as --prune-blocks
            ax.set_title(f"stage {s + 1}{where}: {int(m.sum())} kept", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.legend(handles=[Patch(facecolor=DROPPED_RGB, edgecolor="0.4", label="dropped patch"),
                        Patch(facecolor="none", edgecolor="0.4", label="kept patch: the image as it is")],
               loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle(title or "Kept patches per pruning stage")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path)


def plot_entropy_histograms(entropies: Mapping[float, Sequence[torch.Tensor]], path: str | os.PathLike,
                            layers: Optional[Sequence[int]] = None, bins: int = 60, title: str = ""):
    """The seed's Fig. 5: per block (``layers``, 0-based), the distribution of patch tokens' attention
    entropy for each α, from :func:`eamvit.methods.prune.token_entropies`'s nats, drawn in bits."""
    if not entropies:
        raise EamError("no token entropies to plot")
    ent = {a: [e / math.log(2) for e in per] for a, per in entropies.items()}
    n = len(next(iter(ent.values())))
    shown = list(layers) if layers is not None else list(range(n))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    # One x range and one set of bin edges for every block and α, so that the panels compare directly.
    lo = min(float(e.min()) for per in ent.values() for e in per)
    hi = max(float(e.max()) for per in ent.values() for e in per)
    edges = torch.linspace(lo, hi if hi > lo else lo + 1e-3, bins + 1).numpy()
    pad = 0.02 * float(edges[-1] - edges[0])  # the outer bins' edges stay in view
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 1.2), squeeze=False, sharex=True,
                             layout="constrained")
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= n:
            ax.axis("off")
            continue
        for a, e in ent.items():
            ax.hist(e[i].numpy(), bins=edges, histtype="step", density=True, label=order_label(a), linewidth=1.3)
        ax.set_title(f"block {shown[i]}", fontsize=9)  # 0-based, as --prune-blocks
        ax.set_xlim(float(edges[0]) - pad, float(edges[-1]) + pad)
        ax.tick_params(labelsize=7, labelbottom=True)
        if i % cols == 0:
            ax.set_ylabel("density", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=9, title="entropy", title_fontsize=9)
    fig.supxlabel("attention entropy of a patch token (bits, mean over heads); one x scale for every block",
                  fontsize=9)
    fig.suptitle(title or "Attention-entropy distributions per block")
    return save_figure(fig, path)
