"""Token merging (ToMe, Bolya et al., ICLR 2023): bipartite soft matching, entropy-guided matching,
size-weighted merging and proportional attention. See docs/architecture-core.md."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from eamvit.choices import MERGE_SELECTIONS as SELECTIONS  # one definition, torch-free for the CLI
from eamvit.errors import EamError
from eamvit.ops.scores import take_rows


@dataclass(frozen=True)
class MergePlan:
    """Which patch tokens one merging step keeps (``keep``, in output order: their grid positions carry
    over to the merged tokens) and which (``src``) join which kept one (``dst``, indices into ``keep``)."""

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def merge_count(tokens: int, num_prefix: int, r: int, selection: str = "tome") -> int:
    """``r`` capped at half the patch tokens for ToMe's matching (as ToMe caps it), at all but one for
    entropy-guided merging; never negative."""
    n = tokens - num_prefix
    cap = n // 2 if selection == "tome" else n - 1
    return max(0, min(int(r), cap))


def token_counts(tokens: int, num_prefix: int, rs: Sequence[int], selection: str = "tome") -> list[int]:
    """Tokens (prefix included) entering the first merging step and leaving each one."""
    out = [tokens]
    for r in rs:
        out.append(out[-1] - merge_count(out[-1], num_prefix, r, selection))
    return out


def merge_schedule(r: int, inflect: float, steps: int) -> list[int]:
    """ToMe's per-step ``r``: a straight line averaging ``r``, from ``⌊r·(1 − inflect)⌋`` at the first
    step to ``2r`` minus that at the last, each value truncated to an int (ToMe's arithmetic).

    Args:
        inflect: ``0`` constant, ``−1`` ToMe's "decreasing schedule" (``2r`` down to 0), ``+1`` increasing.
    """
    start = int(r * (1.0 - inflect))
    if steps == 1:
        return [start]
    end = 2 * r - start
    step = (end - start) / (steps - 1)
    return [int(start + step * i) for i in range(steps)]


def _unit(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (a zero row stays zero instead of becoming NaN)."""
    return features / features.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(features.dtype).tiny)


def bipartite_plan(features: torch.Tensor, r: int, num_prefix: int = 1) -> MergePlan:
    """ToMe's bipartite soft matching on ``(B, N, D)`` features, prefix first (ToMe: the keys averaged
    over heads); ``r`` at most :func:`merge_count`. See docs/architecture-core.md."""
    B, N, _ = features.shape
    if not 0 <= r <= (N - num_prefix) // 2:
        raise EamError(f"cannot merge {r} of {N - num_prefix} patch tokens with bipartite matching (at most half)")
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2  # prefix tokens falling into A and into B
    with torch.no_grad():
        unit = _unit(features)
        a, b = unit[:, 0::2], unit[:, 1::2]
        na, nb = a.shape[1], b.shape[1]
        sim = a @ b.transpose(-1, -2)  # (B, na, nb)
        protected = torch.zeros(na, nb, dtype=torch.bool, device=features.device)
        protected[:pa, :] = True
        protected[:, :pb] = True
        best, match = sim.masked_fill(protected, -torch.inf).max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src_a = order[:, :r]
        # The protected A rows (−∞) are never among the r best; sorted, they come first, then go.
        stay_a = order[:, r:].sort(dim=-1).values[:, pa:]
        dst_b = match.gather(1, src_a)
    b_stay = (2 * torch.arange(pb, nb, device=features.device) + 1 - num_prefix).expand(B, -1)
    keep = torch.cat([2 * stay_a - num_prefix, b_stay], dim=1)
    return MergePlan(keep=keep, src=2 * src_a - num_prefix, dst=stay_a.shape[1] + dst_b - pb)


def entropy_plan(features: torch.Tensor, scores: torch.Tensor, r: int, num_prefix: int = 1) -> MergePlan:
    """Entropy-guided matching: the ``r`` patch tokens of highest ``scores`` (attention entropy: more
    redundant) merge into their most similar other patch token (cosine similarity of ``features``)."""
    B, N, _ = features.shape
    n = N - num_prefix
    if scores.shape != (B, n):
        raise EamError(f"entropy-guided merging needs {n} scores per image, got shape {tuple(scores.shape)}")
    if not 0 <= r < max(n, 1):
        raise EamError(f"cannot merge {r} of {n} patch tokens (at least one must stay)")
    with torch.no_grad():
        order = scores.argsort(dim=-1, descending=True)
        src = order[:, :r]
        keep = order[:, r:].sort(dim=-1).values
        unit = _unit(features[:, num_prefix:])
        dst = (take_rows(unit, src) @ take_rows(unit, keep).transpose(-1, -2)).argmax(dim=-1)
    return MergePlan(keep=keep, src=src, dst=dst)


def merge_tokens(x: torch.Tensor, size: Optional[torch.Tensor], plan: MergePlan,
                 num_prefix: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, sizes)`` after ``plan``: each output token the size-weighted mean of those it stands for
    (``size=None``: all 1)."""
    B, N, C = x.shape
    keep, src, dst = plan.keep + num_prefix, plan.src + num_prefix, plan.dst + num_prefix
    if num_prefix:
        keep = torch.cat([torch.arange(num_prefix, device=x.device).expand(B, -1), keep], dim=1)
    if size is None:
        size, weighted = x.new_ones(B, N), x
    else:
        weighted = x * size.unsqueeze(-1)
    # Gathers return fresh tensors: summing into them and dividing them in place copies no tokens again.
    out = take_rows(weighted, keep).scatter_add_(1, dst.unsqueeze(-1).expand(-1, -1, C), take_rows(weighted, src))
    size = size.gather(1, keep).scatter_add_(1, dst, size.gather(1, src))
    return out.div_(size.unsqueeze(-1)), size


def size_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention's additive score term ``log size`` per key, ``(B, 1, 1, N)`` from ``(B, N)``."""
    return size.log()[:, None, None, :]
