"""The cost model: multiply-accumulates (MACs) of the pieces of a transformer layer, as pure arithmetic.

One multiply-add counts as one MAC (fvcore's convention, which the EAM, EViT and DeiT tables use:
DeiT-S = 4.6 GMACs, quoted there as "GFLOPs"). Softmax is not a MAC: it is counted separately as the
number of exponentials (attention entries) it evaluates. Elementwise work (LayerNorm, GELU, residual
adds, the ``torch.where`` that simulates frozen entries) is not counted.

Attention of one layer, per image, with ``G`` windows (1 for ViT) of ``N`` tokens, input width ``C``,
``H`` heads of width ``d`` (``A = H·d``) and output width ``C_out``:

====== =================== ======================================================================
op     MACs                what freezing can skip
====== =================== ======================================================================
q      ``G·N·C·A``         a frozen head skips its ``N·C·d``; a frozen row its ``C·A``
k      ``G·N·C·A``         a frozen head skips its ``N·C·d``
v      ``G·N·C·A``         nothing (``A^μ·V`` needs every value)
qk     ``G·H·N²·d``        a frozen head ``N²·d``; a frozen row ``H·N·d``
softmax ``G·H·N²`` exp     as ``qk``, divided by ``d``
av     ``G·H·N²·d``        nothing (a frozen map still multiplies ``V``)
proj   ``G·N·A·C_out``     nothing
====== =================== ======================================================================

A frozen *entry* (EAM eq. 15) skips nothing as written: the softmax denominator of its row needs
every logit of the row, and ``A^μ ⊗ M`` still multiplies ``V``. Only a (window, head, query) row whose
every entry is frozen could skip its query, its scores and its softmax, and only with a kernel that
gathers the surviving rows; :func:`entry_sparse_skippable` counts that work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

ATTENTION_OPS = ("q", "k", "v", "qk", "softmax", "av", "proj")
NOT_MACS = ("softmax",)


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of one attention layer for one image.

    Args:
        tokens: ``N``, tokens per window (all tokens for ViT).
        windows: ``G``, windows per image (1 for ViT).
        dim: ``C``, input width.
        heads: ``H``.
        head_dim: ``d``.
        out_dim: ``C_out`` of the output projection.
    """

    tokens: int
    windows: int
    dim: int
    heads: int
    head_dim: int
    out_dim: int

    @property
    def attn_dim(self) -> int:
        return self.heads * self.head_dim


def attention_macs(s: AttentionShape, frozen_heads: int = 0, frozen_rows: int = 0) -> dict[str, int]:
    """Per-op work of one attention layer when ``frozen_heads`` whole heads (of every window) or
    ``frozen_rows`` whole query rows (all heads; ViT) are skipped.

    Args:
        s: the layer's sizes.
        frozen_heads: heads whose map is ``A^μ_h`` (q, k, scores and softmax not computed).
        frozen_rows: query tokens whose row is ``A^μ[:, i]`` in every head (q, scores, softmax not
            computed for them); counted per window.

    Returns:
        ``{op: count}`` for :data:`ATTENTION_OPS` (``softmax`` in exponentials, the rest in MACs).
    """
    G, N, C, H, d = s.windows, s.tokens, s.dim, s.heads, s.head_dim
    hq = H - frozen_heads  # heads whose scores are computed
    nq = N - frozen_rows  # query rows whose scores are computed
    return {
        "q": G * nq * C * d * hq,
        "k": G * N * C * d * hq,
        "v": G * N * C * d * H,
        "qk": G * hq * nq * N * d,
        "softmax": G * hq * nq * N,
        "av": G * H * N * N * d,
        "proj": G * N * s.attn_dim * s.out_dim,
    }


def entry_sparse_skippable(mask: torch.Tensor, s: AttentionShape) -> dict[str, int]:
    """Work a kernel that skips fully frozen rows could avoid under entry-level freezing.

    A (window, head, query) row is skippable only if all ``N`` of its entries are frozen (its
    query slice, its ``N`` scores and its softmax); a head is skippable for its keys only if every
    row of it, in every window, is. Partially frozen rows skip nothing.

    Args:
        mask: the layer's frozen-entry mask, ``(H, N, N)`` or ``(G, H, N, N)``.
        s: the layer's sizes.

    Returns:
        ``{op: count}`` over :data:`ATTENTION_OPS` (zeros where nothing is skippable).
    """
    m = mask if mask.dim() == 4 else mask.unsqueeze(0)
    full_rows = m.all(dim=-1)  # (G, H, N)
    rows = int(full_rows.sum())
    heads = int(full_rows.all(dim=-1).all(dim=0).sum())
    N, C, d = s.tokens, s.dim, s.head_dim
    out = dict.fromkeys(ATTENTION_OPS, 0)
    out.update(q=rows * C * d, k=heads * s.windows * N * C * d, qk=rows * N * d, softmax=rows * N)
    return out


def linear_macs(tokens: int, in_features: int, out_features: int) -> int:
    """MACs of a dense layer applied to ``tokens`` vectors."""
    return tokens * in_features * out_features


def conv_macs(out_positions: int, out_channels: int, in_channels: int, groups: int, kernel: tuple[int, ...]) -> int:
    """MACs of a convolution: every output element is a dot product of ``in/groups · ∏kernel`` terms."""
    k = 1
    for w in kernel:
        k *= int(w)
    return out_positions * out_channels * (in_channels // groups) * k


def speedup(full: float, executed: float) -> float:
    """Predicted speed-up ``full / executed`` when time is proportional to MACs."""
    return full / executed if executed else float("inf")


def realised_fraction(measured_ratio: float, predicted_ratio: float) -> Optional[float]:
    """Share of the predicted saving the measurement realised: ``(1 − 1/measured) / (1 − 1/predicted)``.

    ``None`` when nothing was predicted to be saved.
    """
    predicted_saving = 1.0 - 1.0 / predicted_ratio
    if predicted_saving <= 0:
        return None
    return (1.0 - 1.0 / measured_ratio) / predicted_saving
