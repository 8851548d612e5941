"""The cost model: multiply-accumulates (MACs) of the pieces of a transformer layer, as pure arithmetic
(fvcore's convention: one multiply-add is one MAC). See docs/architecture-core.md."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

ATTENTION_OPS = ("q", "k", "v", "qk", "softmax", "av", "proj")
NOT_MACS = ("softmax",)


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of one attention layer for one image: ``N`` tokens per window, ``G`` windows (1 for
    ViT), input width ``C``, ``H`` heads of width ``d``, output width ``C_out``."""

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
    """``{op: count}`` of one attention layer (``softmax`` in exponentials, the rest in MACs).

    Args:
        frozen_heads: heads whose map is ``A^μ_h`` in every window (q, k, scores and softmax skipped).
        frozen_rows: query tokens whose row is ``A^μ[:, i]`` in every head (q, scores and softmax
            skipped), per window.
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
    """``{op: count}`` a kernel that skips fully frozen rows could avoid, from a frozen-entry ``mask``
    ``(H, N, N)`` or ``(G, H, N, N)`` (see docs/architecture-core.md)."""
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
    return out_positions * out_channels * (in_channels // groups) * math.prod(int(w) for w in kernel)


def speedup(full: float, executed: float) -> float:
    """Predicted speed-up ``full / executed`` when time is proportional to MACs."""
    return full / executed if executed else float("inf")


def realised_fraction(measured_ratio: float, predicted_ratio: float) -> Optional[float]:
    """Share of the predicted saving the measurement realised (``None`` when none was predicted)."""
    predicted_saving = 1.0 - 1.0 / predicted_ratio
    if predicted_saving <= 0:
        return None
    return (1.0 - 1.0 / measured_ratio) / predicted_saving
