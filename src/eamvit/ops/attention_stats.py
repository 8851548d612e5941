"""Mean attention distance, per-head attention entropy and per-token Rényi entropy histograms (the
Rényi pruning paper's Fig. 5 and 6), and :class:`AttentionStats`, their streaming accumulator for one
layer. See docs/architecture-core.md."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from eamvit.errors import EamError
from eamvit.ops.scores import attention_entropy, row_entropy

# Bins of the stored Rényi histograms on [0, log N_keys]; figures merge them to what their range needs.
RENYI_BINS = 256


def grid_distances(grid: tuple[int, int], device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n, n)`` Euclidean distances, in patches, between the positions of a row-major ``(rows, columns)`` grid."""
    rows, cols = int(grid[0]), int(grid[1])
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)
    d = torch.sqrt((r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2)
    return d.to(device=device, dtype=dtype)


def attention_distance(attn: torch.Tensor, distances: torch.Tensor, num_prefix: int = 0,
                       renormalize: bool = True) -> torch.Tensor:
    """Attention-weighted mean distance ``(..., n)``, in patches, from each query patch to the key patches.

    Args:
        renormalize: divide by the row's mass on patch keys (a weighted mean; a row with no such mass
            gets 0); ``False`` keeps the raw weights (mass on prefix tokens counts as distance 0).
    """
    n = distances.shape[-1]
    if attn.shape[-1] != num_prefix + n or attn.shape[-2] != num_prefix + n:
        raise EamError(f"attention of {attn.shape[-2]} x {attn.shape[-1]} tokens is not {num_prefix} prefix "
                       f"tokens plus the {n} patches of the grid; mean attention distance needs the full patch grid")
    a = attn[..., num_prefix:, num_prefix:]
    d = (a * distances.to(a.dtype)).sum(-1)
    if not renormalize:
        return d
    mass = a.sum(-1)
    return torch.where(mass > 0, d / mass.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(d))


def patch_prefix(shape: Sequence[int], grid: Optional[Sequence[int]], num_prefix: int) -> Optional[int]:
    """The prefix tokens (``0`` or ``num_prefix``) of a layer whose per-image attention ``shape`` is
    ``(H, N, N)`` over them and the whole patch grid; ``None`` for any other layer (windows, pooled keys,
    class or channel attention). A layer may run on the patches alone, as CaiT's patch-attention layers do.
    """
    if grid is None or len(shape) != 3 or shape[-1] != shape[-2]:
        return None
    extra = shape[-1] - int(grid[0]) * int(grid[1])
    return extra if extra in {0, num_prefix} else None


def check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    """Rényi orders as floats: each ``≥ 0`` (``math.inf`` allowed), none twice."""
    out = tuple(float(a) for a in orders)
    bad = [a for a in out if math.isnan(a) or a < 0]
    if bad:
        raise EamError(f"Rényi order {format_order(bad[0])} is not >= 0; give orders such as 0.5,1,2,inf")
    if len(set(out)) != len(out):
        raise EamError(f"Rényi orders {','.join(format_order(a) for a in out)} name one order twice; give each once")
    return out


def format_order(alpha: float) -> str:
    """``0.5``, ``1``, ``2``, ``inf``: an order as the options take it."""
    return "inf" if math.isinf(alpha) else f"{alpha:g}"


def renyi_bin(h: torch.Tensor, num_keys: int, bins: int = RENYI_BINS) -> torch.Tensor:
    """Bin of each entropy ``h`` (nats) on ``[0, log num_keys]`` split into ``bins`` equal bins."""
    top = math.log(num_keys) if num_keys > 1 else 1.0
    return (h.double() * (bins / top)).floor().clamp_(0, bins - 1).long()


class AttentionStats:
    """Per-head mean attention distance and attention entropy (the Rényi paper's Def. 2: Shannon, in
    nats, of a patch query's row over all keys), and histograms of the per-token Rényi scores token
    pruning ranks, for one layer of ``num_tokens`` tokens (prefix + patches), streamed over batches.
    ``grid=None`` skips the distance and head entropy."""

    def __init__(self, heads: int, num_tokens: int, num_prefix: int, grid: Optional[tuple[int, int]],
                 orders: Sequence[float] = (), bins: int = RENYI_BINS, device: torch.device | str = "cpu"):
        self.heads, self.num_tokens, self.num_prefix, self.bins = heads, num_tokens, num_prefix, bins
        self.orders = check_orders(orders)
        self.distances = grid_distances(grid, device) if grid is not None else None
        if self.distances is not None and self.distances.shape[0] + num_prefix != num_tokens:
            raise EamError(f"{num_tokens} tokens are not {num_prefix} prefix tokens plus a {grid[0]}x{grid[1]} grid")
        self.distance_sum = torch.zeros(heads, dtype=torch.float64, device=device)
        self.entropy_sum = torch.zeros(heads, dtype=torch.float64, device=device)
        self.rows = 0
        self.renyi_counts = torch.zeros(len(self.orders), bins, dtype=torch.int64, device=device)

    def update(self, attn: torch.Tensor) -> None:
        """Add a batch ``(B, H, N, N)`` of attention maps."""
        if tuple(attn.shape[1:]) != (self.heads, self.num_tokens, self.num_tokens):
            raise EamError(f"attention shape {tuple(attn.shape[1:])} does not match the calibrated "
                           f"{(self.heads, self.num_tokens, self.num_tokens)}")
        attn = attn.detach()
        if self.distances is not None:
            d = attention_distance(attn, self.distances, self.num_prefix)  # (B, H, n)
            self.distance_sum += d.double().sum((0, 2))
            self.entropy_sum += row_entropy(attn[:, :, self.num_prefix:, :]).double().sum((0, 2))
            self.rows += d.shape[0] * d.shape[2]
        for i, alpha in enumerate(self.orders):
            h = attention_entropy(attn, alpha, self.num_prefix)  # (B, n), the pruning scores
            self.renyi_counts[i] += torch.bincount(renyi_bin(h, self.num_tokens, self.bins).flatten(),
                                                   minlength=self.bins)

    def distance(self) -> Optional[torch.Tensor]:
        """``(H,)`` mean attention distance in patches (``None`` without a grid)."""
        return None if self.distances is None else (self.distance_sum / max(self.rows, 1)).float()

    def head_entropy(self) -> Optional[torch.Tensor]:
        """``(H,)`` mean Shannon entropy (nats) of the patch queries' rows (``None`` without a grid)."""
        return None if self.distances is None else (self.entropy_sum / max(self.rows, 1)).float()

    def result(self) -> dict[str, Optional[torch.Tensor]]:
        """``distance``, ``head_entropy`` and the ``renyi`` counts on the CPU; ``None`` if not measured."""
        out = {"distance": self.distance(), "head_entropy": self.head_entropy(),
               "renyi": self.renyi_counts if self.orders else None}
        return {k: None if v is None else v.cpu() for k, v in out.items()}

    def state(self) -> dict:
        """The running sums, to checkpoint or all-reduce."""
        return {"distance_sum": self.distance_sum, "entropy_sum": self.entropy_sum,
                "rows": torch.tensor(self.rows, dtype=torch.int64), "renyi_counts": self.renyi_counts}

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` (a checkpoint, or sums reduced over processes)."""
        self.distance_sum.copy_(state["distance_sum"])
        self.entropy_sum.copy_(state["entropy_sum"])
        self.rows = int(state["rows"])
        self.renyi_counts.copy_(state["renyi_counts"])
