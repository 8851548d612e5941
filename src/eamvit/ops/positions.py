"""Token positions under pruning, and the position terms (EVA02's RoPE, BEiT's relative-position
bias) gathered for them.

A *position* is a token's index among the tokens entering the first pruning stage (prefix first); EViT's
fused token has none and is marked ``-1``: it gets the identity rotation and zero relative-position bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from eamvit.errors import EamError


def next_positions(positions: Optional[torch.Tensor], keep: torch.Tensor, num_prefix: int, n: int,
                   fuse: bool) -> torch.Tensor:
    """Positions after one pruning step: the prefix, the kept patches (in ``keep`` order), ``-1`` if fused;
    ``positions=None`` is ``0..n-1`` (nothing pruned yet)."""
    if positions is None:
        positions = torch.arange(n, device=keep.device).expand(keep.shape[0], -1)
    parts = [positions[:, :num_prefix], positions[:, num_prefix:].gather(1, keep)]
    if fuse:
        parts.append(positions.new_full((keep.shape[0], 1), -1))
    return torch.cat(parts, dim=1)


def gather_rope(rope: torch.Tensor, positions: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """EVA02's concatenated ``[sin, cos]`` RoPE of the present patch tokens, ``(B, 1, n, D)``, from the
    full grid's ``(N, D)`` or ``(B, 1, N, D)`` (per image, after timm's patch dropout)."""
    B = positions.shape[0]
    if rope.dim() == 2:
        rope = rope.unsqueeze(0).expand(B, -1, -1)
    elif rope.dim() == 4 and rope.shape[1] == 1:
        rope = rope[:, 0]
    else:
        raise EamError(f"token pruning cannot gather a rotary embedding of shape {tuple(rope.shape)}; "
                       "only EVA02's shared (N, D) RoPE is supported")
    half = rope.shape[-1] // 2
    # The fused token gets the identity rotation (sin 0, cos 1): it has no grid position.
    identity = torch.cat([rope.new_zeros(B, 1, half), rope.new_ones(B, 1, rope.shape[-1] - half)], dim=-1)
    table = torch.cat([rope, identity], dim=1)
    idx = positions[:, num_prefix:] - num_prefix
    idx = torch.where(idx < 0, rope.shape[1], idx)
    return table.gather(1, idx.unsqueeze(-1).expand(-1, -1, rope.shape[-1])).unsqueeze(1)


def gather_pair_bias(bias: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A bias over token pairs ``(1?, H, N, N)`` (indexed by the tokens entering the first pruning
    stage) for the present tokens at ``positions``: ``(B, H, n, n)``, zero to and from a fused token."""
    bias = bias.reshape(bias.shape[-3:])
    N = bias.shape[-1]
    table = F.pad(bias, (0, 1, 0, 1))
    idx = torch.where(positions < 0, N, positions)
    return table[:, idx.unsqueeze(-1), idx.unsqueeze(-2)].transpose(0, 1)
