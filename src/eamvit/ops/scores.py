"""Token scores for patch-token pruning (attention entropy, EViT, random), top-k selection, EViT's
token fusion, and tracing kept indices back to the patch grid. See docs/architecture-core.md."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from eamvit.choices import ENTROPY_KEYS as KEYS, PRUNE_METHODS as METHODS  # one definition, torch-free
from eamvit.errors import EamError


def row_entropy(p: torch.Tensor, alpha: float = 1.0, mass: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rényi entropy ``H_α = log(Σ p^α) / (1 − α)``, natural log, of each row of ``p`` (``α = 1``
    Shannon, ``∞`` min-entropy, ``0`` Hartley ``log |support|``).

    Args:
        mass: per-row sum ``S`` when the rows are ``S·q`` for a distribution ``q``: the entropy of ``q``
            is returned without materialising ``p / S``.
    """
    alpha = float(alpha)
    if p.dtype not in (torch.float32, torch.float64):
        p = p.float()  # half-precision logs and powers of small probabilities lose too much
    if alpha == 1.0:
        h = torch.special.entr(p).sum(-1)
        return h if mass is None else h / mass + mass.log()
    if alpha == 0.0:
        return torch.count_nonzero(p, dim=-1).to(p.dtype).log()  # independent of the scale S
    if math.isinf(alpha):
        h = -p.amax(-1).log()
        return h if mass is None else h + mass.log()
    # vector_norm reduces Σ p^α without an intermediate tensor: log Σ p^α = α·log ‖p‖_α.
    c = alpha / (1.0 - alpha)
    h = c * torch.linalg.vector_norm(p, ord=alpha, dim=-1).log()
    return h if mass is None else h - c * mass.log()


def attention_entropy(attn: torch.Tensor, alpha: float = 1.0, num_prefix: int = 1, keys: str = "all") -> torch.Tensor:
    """Per patch token, the entropy (Rényi order ``alpha``) of its post-softmax attention row, per head
    then averaged over heads: ``(B, N − num_prefix)`` scores, lower = more informative = kept.

    ``keys="patches"`` takes the row over patch keys only, renormalised; ``"all"`` the row as computed.
    """
    return _row_scores(attn[:, :, num_prefix:, :], alpha, num_prefix, keys)


def _row_scores(rows: torch.Tensor, alpha: float, num_prefix: int, keys: str) -> torch.Tensor:
    """The entropies of the patch queries' rows ``(B, H, n, N)``, averaged over heads."""
    mass = None
    if keys == "patches":
        rows = rows[..., num_prefix:]
        mass = rows.sum(-1)
    elif keys != "all":
        raise EamError(f"entropy keys {keys!r} is not one of {', '.join(KEYS)}")
    return row_entropy(rows, alpha, mass).mean(1)


def entropy_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float, alpha: float = 1.0, num_prefix: int = 1,
                    keys: str = "all", bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`attention_entropy` of ``softmax(q·scale·kᵀ)``, computing only the patch queries' rows.

    The Shannon entropy over all keys is taken from the scores, ``H = log Σ e^z − Σ e^z·z / Σ e^z``
    with ``z`` the row minus its maximum: one logarithm per row instead of one per entry, so an export
    has no elementwise ``Log`` over the map, which runtimes run slowly.

    Args:
        scale: the score scale (``d^-0.5``), applied to ``q`` first, as timm's attention does.
        bias: added to the scores before the softmax (token merging's ``log size``).
    """
    s = (q[:, :, num_prefix:] * scale) @ k.transpose(-2, -1)
    if bias is not None:
        s = s + bias
    if float(alpha) != 1.0 or keys != "all":
        return _row_scores(s.softmax(dim=-1), alpha, num_prefix, keys)
    z = s - s.amax(dim=-1, keepdim=True)
    e = z.exp()
    total = e.sum(-1)
    return (total.log() - (e * z).sum(-1) / total).mean(1)


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The class token's row of ``softmax(q·scale·kᵀ)``, ``(B, H, 1, N)``: all EViT reads of the map.

    Written as a product and a sum over ``d``, not a matrix product, so that a quantizer of an export
    (NNCF) leaves it in float, as the scores' top-k needs.
    """
    return ((q[:, :, :1] * scale) * k).sum(-1).unsqueeze(2).softmax(dim=-1)


def evit_scores(attn: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """EViT's importance (higher = kept): the class token's attention to each patch, averaged over heads.

    ``attn`` may be the whole map or only its class-token row (:func:`class_attention`).
    """
    return attn[:, :, 0, num_prefix:].mean(1)


def kept_count(n: int, keep_rate: float) -> int:
    """Patch tokens kept out of ``n``: ``ceil(κ·n)`` computed as EViT's code does (at least 1)."""
    return max(1, min(n, math.ceil(keep_rate * n)))


def fuse_dropped(patches: torch.Tensor, weights: torch.Tensor, keep_idx: torch.Tensor,
                 elementwise: bool = False) -> torch.Tensor:
    """EViT's fused token ``Σ_{j dropped} x_j·w_j`` (not normalised), ``(B, 1, C)``, as one product over
    all patches with the kept ones' weights zeroed.

    ``elementwise``, the export form, multiplies and sums instead: NNCF quantizes matrix products'
    inputs, and would put the tokens and weights through int8 where the reference sums in float.
    """
    w = weights.to(patches.dtype).scatter(1, keep_idx, 0.0)
    if elementwise:
        return (w.unsqueeze(-1) * patches).sum(1, keepdim=True)
    return torch.bmm(w.unsqueeze(1), patches)


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` for every image, as rows of the flattened batch.

    An export then holds one row ``Gather``, which runtimes run as row copies, instead of
    ``GatherElements`` with an index per channel (OpenVINO runs that one in its reference kernel).
    """
    B, N, C = x.shape
    flat = idx + (torch.arange(B, device=x.device) * N).unsqueeze(1)
    return x.reshape(B * N, C).index_select(0, flat.reshape(-1)).view(B, idx.shape[1], C)


def stage_value(value: float | Sequence[float], stage: int) -> float:
    """A per-stage setting at ``stage``: the one number, or the ``stage``-th of one per stage."""
    return float(value[stage]) if isinstance(value, (tuple, list)) else float(value)


def token_counts(num_patches: int, keep_rate: float | Sequence[float], stages: int, fuse: bool = False) -> list[int]:
    """Patch-token counts (fused token included) entering the model and after each stage.

    ``token_counts(196, 0.7, 3)`` = ``[196, 138, 97, 68]``; with ``fuse=True`` ``[196, 139, 99, 71]``.
    """
    if isinstance(keep_rate, (tuple, list)) and len(keep_rate) != stages:
        raise EamError(f"{len(keep_rate)} keep rates for {stages} pruning stages; give one per stage")
    counts = [num_patches]
    for s in range(stages):
        k = kept_count(counts[-1], stage_value(keep_rate, s))
        counts.append(k + (1 if fuse and k < counts[-1] else 0))
    return counts


def default_blocks(depth: int) -> tuple[int, ...]:
    """EViT's 0-based (3, 6, 9) of 12 blocks, scaled: ``⌊depth·i/4⌋`` for i = 1, 2, 3 (deduplicated)."""
    return tuple(sorted({depth * i // 4 for i in (1, 2, 3)}))


def check_keep_rate(keep_rate: float) -> float:
    """``keep_rate`` as a float, or :class:`EamError` when it is outside (0, 1]."""
    if not isinstance(keep_rate, (int, float)) or math.isnan(keep_rate) or not 0.0 < keep_rate <= 1.0:
        raise EamError(f"keep rate {keep_rate} is outside (0, 1]; give a fraction such as 0.7")
    return float(keep_rate)


def prune_tokens(x: torch.Tensor, attn: Optional[torch.Tensor], method: str, num_prefix: int, k: int,
                 order: float = 1.0, keys: str = "all", fuse: bool = False,
                 generator: Optional[torch.Generator] = None, scores: Optional[torch.Tensor] = None,
                 elementwise: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pruning step keeping ``k`` patch tokens of ``x`` (prefix first) by ``method`` (:data:`METHODS`):
    ``(tokens, keep_idx, scores)``, ``keep_idx`` best first (``torch.topk`` order, as EViT).

    Args:
        attn: the block's post-softmax attention (``None`` for unfused random).
        fuse: append EViT's fused token of the dropped patches (weights: class-token attention).
        scores: the entropy methods' scores when already computed (:func:`entropy_from_qk`); ``attn``
            then need only hold the class-token row, for the fusion weights.
        elementwise: the export form of the fused token (:func:`fuse_dropped`).
    """
    B, N, _ = x.shape
    if scores is None and method == "evit":
        scores = evit_scores(attn, num_prefix)
    elif scores is None and method == "random":
        scores = torch.rand(B, N - num_prefix, generator=generator, device=x.device)
    elif scores is None:
        scores = attention_entropy(attn, order, num_prefix, keys)
    keep = torch.topk(scores, k, dim=1, largest=method in ("evit", "random"), sorted=True).indices
    idx = keep + num_prefix
    if num_prefix:  # the prefix and the kept patches in one gather
        idx = torch.cat([torch.arange(num_prefix, device=x.device).expand(B, num_prefix), idx], dim=1)
    out = take_rows(x, idx)
    if fuse:
        out = torch.cat([out, fuse_dropped(x[:, num_prefix:], evit_scores(attn, num_prefix), keep, elementwise)], dim=1)
    return out, keep, scores


def trace_indices(stage_idx: Sequence[Optional[torch.Tensor]], num_patches: int, fuse: bool, batch: int = 1,
                  device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Per stage, the original patch indices ``(B, n_s)`` of the tokens leaving it (fused token: ``-1``).

    Args:
        stage_idx: per stage, ``(B, k_s)`` indices into that stage's input patch tokens, or ``None``
            where the stage kept everything.
        batch, device: of the result when no stage pruned.
    """
    first = next((i for i in stage_idx if i is not None), None)
    if first is not None:
        batch, device = first.shape[0], first.device
    origin = torch.arange(num_patches, device=device).expand(batch, -1)
    out = []
    for idx in stage_idx:
        if idx is not None:
            origin = origin.gather(1, idx)
            if fuse:
                origin = torch.cat([origin, origin.new_full((origin.shape[0], 1), -1)], dim=1)
        out.append(origin)
    return out

