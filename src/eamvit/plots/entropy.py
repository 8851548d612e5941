"""Figures of the EAM paper: CLS-row entropy per head (Fig. 2), full entropy maps (Fig. 3), a
layer x head summary, and top-1 against sparsity (Fig. 5/6). All PNGs are written atomically."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


from eamvit.methods.calibrate import EntropyMaps  # noqa: E402
from eamvit.ops.entropy import mean_entropy_per_head  # noqa: E402
from eamvit.errors import EamError  # noqa: E402
from eamvit.io import atomic_path  # noqa: E402


def save_figure(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _grid(maps: EntropyMaps, n_patches: int) -> tuple[int, int]:
    g = maps.meta.get("grid")
    if g and g[0] * g[1] == n_patches:
        return int(g[0]), int(g[1])
    side = int(math.isqrt(n_patches))
    if side * side != n_patches:
        raise EamError(f"cannot lay {n_patches} patch tokens on a square grid")
    return side, side


def plot_cls_entropy(maps: EntropyMaps, layer: int, path: str | os.PathLike, heads: Optional[Sequence[int]] = None) -> None:
    """Fig. 2: entropy of the CLS token's attention to every patch, one panel per head."""
    ent = maps.entropy[layer]
    if ent.dim() != 3:
        raise EamError("CLS-row maps need a model with a class token (ViT/DeiT); for Swin use the full maps")
    prefix = int(maps.meta.get("num_prefix_tokens", 1))
    rows = ent[:, 0, prefix:]
    gh, gw = _grid(maps, rows.shape[-1])
    heads = list(heads) if heads is not None else list(range(rows.shape[0]))
    vmax = float(ent.max())
    fig, axes = plt.subplots(1, len(heads), figsize=(2.6 * len(heads), 2.8), squeeze=False)
    for ax, h in zip(axes[0], heads):
        im = ax.imshow(rows[h].view(gh, gw).numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"L{layer + 1}H{h + 1}")
        ax.axis("off")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="entropy (bits)")
    fig.suptitle(f"CLS-token entropy attention maps, layer {layer + 1} (M={maps.meta.get('num_images')})")
    save_figure(fig, path)


def plot_full_entropy(maps: EntropyMaps, pairs: Sequence[tuple[int, int]], path: str | os.PathLike) -> None:
    """Fig. 3: the full ``N x N`` entropy map of chosen (layer, head) pairs (Swin: window 0)."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.4 * len(pairs), 3.2), squeeze=False)
    vmax = max(float(e.max()) for e in maps.entropy)
    for ax, (l, h) in zip(axes[0], pairs):
        e = maps.entropy[l]
        m = e[h] if e.dim() == 3 else e[0, h]
        im = ax.imshow(m.numpy(), cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"L{l + 1}H{h + 1}")
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="entropy (bits)")
    save_figure(fig, path)


def plot_head_summary(maps: EntropyMaps, path: str | os.PathLike) -> None:
    """Mean entropy of every (layer, head): where the low-entropy heads are."""
    s = mean_entropy_per_head(maps.entropy)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * s.shape[1], 0.9 + 0.4 * s.shape[0]))
    im = ax.imshow(s.numpy(), cmap="viridis", aspect="auto")
    for (l, h), v in zip(((l, h) for l in range(s.shape[0]) for h in range(s.shape[1])), s.flatten().tolist()):
        if not math.isnan(v):
            ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(s.shape[1]), [f"H{h + 1}" for h in range(s.shape[1])])
    ax.set_yticks(range(s.shape[0]), [f"L{l + 1}" for l in range(s.shape[0])])
    fig.colorbar(im, ax=ax, label="mean entropy (bits)")
    ax.set_title("mean entropy per layer and head")
    save_figure(fig, path)


def plot_sweep(rows: Sequence[dict], path: str | os.PathLike, title: str = "",
               reference: Optional[dict[str, float]] = None) -> None:
    """Top-1 against sparsity τ, one line per (label, selection, scope); random with ±1 std band."""
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = []
    for r in rows:
        k = (r.get("label", ""), r["selection"], r.get("scope", ""), r.get("value_bits", 32))
        if k not in keys:
            keys.append(k)
    for k in keys:
        pts = sorted((r for r in rows if (r.get("label", ""), r["selection"], r.get("scope", ""),
                                          r.get("value_bits", 32)) == k), key=lambda r: r["tau"])
        x = [100 * r["tau"] for r in pts]
        y = [r["top1"] for r in pts]
        name = " ".join(str(p) for p in (k[0], k[1], f"scope={k[2]}" if k[2] else "",
                                          f"{k[3]}-bit values" if k[3] != 32 else "") if p)
        line, = ax.plot(x, y, marker="o" if k[1] == "entropy" else "x",
                        linestyle="-" if k[1] == "entropy" else "--", label=name)
        if k[1] == "random":
            std_band(ax, line, pts)
    for name, val in (reference or {}).items():
        ax.axhline(val, color="gray", linestyle=":", linewidth=1)
        ax.text(0, val, f" {name}", va="bottom", fontsize=8, color="gray")
    finish_sweep(fig, ax, path, title or "EAM freezing vs random freezing")


def std_band(ax, line, rows: Sequence[dict]) -> None:
    """Shade ±1 std of ``top1`` (random freezing over seeds) around ``line``."""
    if not any(r.get("top1_std") for r in rows):
        return
    x = [100 * r["tau"] for r in rows]
    y = [r["top1"] for r in rows]
    sd = [r.get("top1_std", 0.0) for r in rows]
    ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                    color=line.get_color(), alpha=0.15)


def finish_sweep(fig, ax, path: str | os.PathLike, title: str) -> None:
    """Axes, grid and legend shared by every top-1-against-τ figure, then save."""
    ax.set_xlabel("sparsity τ (% of attention entries frozen)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
