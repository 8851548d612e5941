"""Figures of the EAM paper: CLS-row entropy per head (Fig. 2), full entropy maps (Fig. 3), a layer x
head summary, and top-1 against sparsity (Fig. 5/6). See docs/architecture-core.md."""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eamvit.methods.calibrate import EntropyMaps  # noqa: E402
from eamvit.ops.entropy import cls_row, mean_entropy_per_head  # noqa: E402
from eamvit.errors import EamError  # noqa: E402
from eamvit.io import atomic_path  # noqa: E402


def save_figure(fig, path: str | os.PathLike):
    """Write ``fig`` as a PNG (atomically), close it, and return it for inspection (colour limits, labels):
    every ``plot_*`` function returns what this returns."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return fig


def _grid(maps: EntropyMaps, n_patches: int) -> tuple[int, int]:
    g = maps.meta.get("grid")
    if g and g[0] * g[1] == n_patches:
        return int(g[0]), int(g[1])
    side = int(math.isqrt(n_patches))
    if side * side != n_patches:
        raise EamError(f"cannot lay {n_patches} patch tokens on a square grid")
    return side, side


def entropy_limits(maps: EntropyMaps) -> tuple[float, float]:
    """The one colour scale of every entropy map figure: 0 to ``b`` bits, the most a histogram of ``2^b``
    bins can hold, so it is the same for every layer, figure and run with that ``b`` (maps without
    ``bits``: 0 to their largest entry)."""
    bits = maps.meta.get("bits")
    if isinstance(bits, int) and bits > 0:
        return 0.0, float(bits)
    return 0.0, max(float(e.max()) for e in maps.entropy) or 1.0


ENTROPY_CMAP = "viridis"  # CLS-row and full maps alike, so one colour means one entropy in both


def plot_cls_entropy(maps: EntropyMaps, layer: int, path: str | os.PathLike, heads: Optional[Sequence[int]] = None):
    """Fig. 2: entropy of the CLS token's attention to every patch of ``layer``, one panel per head, on
    the scale of :func:`entropy_limits`."""
    rows = cls_row(maps.entropy, layer, int(maps.meta.get("num_prefix_tokens", 1)))
    if rows is None:
        raise EamError("CLS-row maps need a model with a class token (ViT/DeiT); for Swin use the full maps")
    vmin, vmax = entropy_limits(maps)
    gh, gw = _grid(maps, rows.shape[-1])
    heads = list(heads) if heads is not None else list(range(rows.shape[0]))
    fig, axes = plt.subplots(1, len(heads), figsize=(2.4 * len(heads) + 1.2, 2.9), squeeze=False,
                             layout="constrained")
    for ax, h in zip(axes[0], heads):
        im = ax.imshow(rows[h].reshape(gh, gw).numpy(), cmap=ENTROPY_CMAP, vmin=vmin, vmax=vmax)
        ax.set_title(f"layer {layer}, head {h}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="entropy (bits)\none scale for all layers\nand the full maps")
    fig.suptitle(f"CLS-token entropy over the {gh}x{gw} patches, layer {layer} of 0..{maps.num_layers - 1} "
                 f"(M={maps.meta.get('num_images')} images)", fontsize=10)
    return save_figure(fig, path)


def plot_full_entropy(maps: EntropyMaps, pairs: Sequence[tuple[int, int]], path: str | os.PathLike):
    """Fig. 3: the full ``N x N`` entropy map of chosen (layer, head) pairs (Swin: window 0), on the scale
    of :func:`entropy_limits`."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.3 * len(pairs) + 1.2, 3.6), squeeze=False,
                             layout="constrained")
    vmin, vmax = entropy_limits(maps)
    for ax, (l, h) in zip(axes[0], pairs):
        e = maps.entropy[l]
        m = e[h] if e.dim() == 3 else e[0, h]
        im = ax.imshow(m.numpy(), cmap=ENTROPY_CMAP, vmin=vmin, vmax=vmax)
        ax.set_title(f"layer {l}, head {h}", fontsize=9)
        ax.set_xlabel("key token j" + (" (0: CLS)" if e.dim() == 3 else ""), fontsize=8)
        ax.set_ylabel("query token i", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="entropy of entry (i, j) (bits)\nsame scale as the CLS-row maps")
    swin = " (Swin: window 0)" if maps.entropy[0].dim() == 4 else ""
    fig.suptitle(f"Entropy attention maps, all query-key entries{swin} "
                 f"(M={maps.meta.get('num_images')} images)", fontsize=10)
    return save_figure(fig, path)


def text_colour(rgb: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with a cell of colour ``rgb`` (WCAG contrast ratio)."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]  # relative luminance
    return "k" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "w"


def plot_head_summary(maps: EntropyMaps, path: str | os.PathLike):
    """Mean entropy of every (layer, head): where the low-entropy heads are."""
    s = mean_entropy_per_head(maps.entropy)
    n_layers, n_heads = s.shape
    fig, ax = plt.subplots(figsize=(max(7.5, 1.8 + 0.9 * n_heads), max(4.0, 1.2 + 0.55 * n_layers)),
                           layout="constrained")
    im = ax.imshow(s.numpy(), cmap=ENTROPY_CMAP, aspect="auto")
    for l in range(n_layers):
        for h in range(n_heads):
            v = float(s[l, h])
            if not math.isnan(v):
                ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=10,
                        color=text_colour(im.cmap(im.norm(v))))
    ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)])
    ax.set_yticks(range(n_layers), [str(l) for l in range(n_layers)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="mean entropy (bits)")
    ax.set_title(f"mean entropy per layer and head (M={maps.meta.get('num_images')} images)", fontsize=11)
    return save_figure(fig, path)


def plot_sweep(rows: Sequence[dict], path: str | os.PathLike, title: str = "",
               reference: Optional[dict[str, float]] = None):
    """Top-1 against sparsity τ, one line per (label, selection, scope, value bits) of the sweep rows;
    random with a ±1 std band; ``reference`` ``{name: top-1}`` lines (the unfrozen model) in the legend."""
    fig, ax = plt.subplots(figsize=(9.2, 5.4))
    key = lambda r: (r.get("label", ""), r["selection"], r.get("scope", ""), r.get("value_bits", 32))  # noqa: E731
    for k, pts, x, y in tau_series(rows, key):
        name = " ".join(str(p) for p in (k[0], k[1], f"scope={k[2]}" if k[2] else "",
                                          f"{k[3]}-bit values" if k[3] != 32 else "") if p)
        line, = ax.plot(x, y, marker="o" if k[1] == "entropy" else "x",
                        linestyle="-" if k[1] == "entropy" else "--", label=name)
        if k[1] == "random":
            std_band(ax, line, x, y, pts)
    # References go in the legend, not as text by the line: at τ = 0 the curves start on them.
    for i, (name, val) in enumerate((reference or {}).items()):
        ax.axhline(val, color="0.35", linestyle=(0, (1, 1 + i)), linewidth=1.2, zorder=1,
                   label=f"{name} ({val:.2f} %)")
    return finish_sweep(fig, ax, path, title or "EAM freezing vs random freezing")


def tau_series(rows: Sequence[dict], key: Callable[[dict], tuple]) -> Iterator[tuple[tuple, list, list, list]]:
    """``(key, its rows by τ, τ in %, top-1)`` of every series ``key(row)``, in order of first appearance."""
    for k in dict.fromkeys(map(key, rows)):
        pts = sorted((r for r in rows if key(r) == k), key=lambda r: r["tau"])
        yield k, pts, [100 * r["tau"] for r in pts], [r["top1"] for r in pts]


def std_band(ax, line, x: Sequence[float], y: Sequence[float], rows: Sequence[dict]) -> None:
    """Shade ±1 std of ``top1`` (random freezing over seeds) around ``line`` through ``(x, y)``."""
    if not any(r.get("top1_std") for r in rows):
        return
    sd = [r.get("top1_std", 0.0) for r in rows]
    ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                    color=line.get_color(), alpha=0.15)


def finish_sweep(fig, ax, path: str | os.PathLike, title: str):
    """Axes, grid and legend shared by every top-1-against-τ figure, then save."""
    ax.set_xlabel("sparsity τ (% of attention entries frozen)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
