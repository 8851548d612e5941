"""Patch-token pruning inside a timm ViT/DeiT: attention entropy (Shannon, Rényi), EViT and random.

Scoring (seed 002, Def. 1-3): every patch token's attention row is a distribution; its entropy is
computed per head (natural log) and averaged over heads. Low entropy = concentrated attention = an
informative patch, so the *lowest* scores are kept. EViT (ICLR'22) keeps the patches the class token
attends to most (``attn[:, :, 0, P:]`` averaged over heads) and can fuse the dropped tokens into one
(``Σ_j x_j·a_j`` over the dropped ``j``, not normalised). ``random`` keeps a uniformly random subset.

Mechanism. :func:`prune_` swaps the chosen timm ``Block`` objects for :class:`PruneBlock` by class
(ToMe-style; no weights copied, no per-instance ``forward``, no module-name matching). A pruning block
reads its attention map through the one instrumentation of :mod:`eamvit.modules.attention`: during its own
call it installs an observer on its attention module (chaining any observer already there), so only
pruning blocks materialise ``A``; every other block, and a pruning block with nothing to prune
(κ = 1, or the ``random`` method), runs timm's fused attention. Each stage keeps
``ceil(κ·(N−1))`` patch tokens (``N−1`` counts the fused token of an earlier stage as an ordinary
token, as EViT does), the class/distillation/register tokens always; the kept tokens are gathered
once. Kept indices are traced back to the original patch grid (:func:`kept_indices`).

Defaults and options (deviations from a reference are options with a documented default):

* ``placement="attn"`` (EViT's code and the default): prune after the attention residual, before
  ``norm2``/MLP. ``"block"``: prune after the whole block (seed §3.3 step 3, "only the selected tokens
  are propagated to the next layer").
* ``keys="all"`` (default): the entropy of the softmax row as the block computes it, over all keys
  including the class token (seed §3.3 step 1, "the softmax yields an attention distribution for each
  patch"). ``"patches"``: the row restricted to patch keys and renormalised (a literal reading of
  Def. 1, whose distribution is over patch tokens).
* ``fuse``: default on for EViT (its code), off for entropy and random (the seed propagates only the
  selected tokens). When on, the weights are the class-token attention, as in EViT.
* ``ceil`` is ``math.ceil(κ·n)`` in floating point, exactly as EViT's code computes it.
* Fine-tuning: the captured attention map is the live tensor, so, as in EViT, gradients flow
  through the fusion weights ``a_j`` as well as through ``x_j``.

Composition with EAM freezing: frozen maps are shaped for the full token count, so they only apply up
to the first pruning block (its attention still sees every token). With κ < 1, :func:`prune_`
therefore keeps frozen maps on layers ``≤`` the first pruning block and removes them from later
layers (``frozen_after="drop"``, the default; listed in the returned :class:`PruneReport`), or
refuses the combination with one clear line (``frozen_after="refuse"``). κ = 1 leaves everything as
it was. Frozen maps on later layers met at a forward that prunes (freezing after pruning, or κ
raised from 1 by :func:`set_keep_rate`) are refused with one clear line.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from timm.models.vision_transformer import Block

from eamvit.modules.attention import attention_layers, instrument, observe
from eamvit.errors import EamError
from eamvit.methods.models import num_prefix_tokens, patch_grid

METHODS = ("shannon", "renyi", "evit", "random")
PLACEMENTS = ("attn", "block")
KEYS = ("all", "patches")
FROZEN_AFTER = ("drop", "refuse")
EVIT_BLOCKS_12 = (3, 6, 9)  # EViT's pruning locations for 12-block DeiT (the 4th, 7th and 10th block)


# --------------------------------------------------------------------------------------------------
# Pure scoring functions
# --------------------------------------------------------------------------------------------------

def row_entropy(p: torch.Tensor, alpha: float = 1.0, mass: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shannon (``alpha == 1``) or Rényi entropy, natural log, of each row (last dim) of ``p``.

    ``H_α = log(Σ p^α) / (1 − α)``; ``α = 1`` is Shannon ``−Σ p log p`` (the limit), ``α = ∞`` is the
    min-entropy ``−log max p``, ``α = 0`` is ``log |support|`` (the Hartley entropy). Zero entries
    contribute nothing (``0·log 0 = 0``).

    Args:
        p: non-negative rows; each row is a distribution (or ``mass`` times one).
        alpha: Rényi order, ``≥ 0``; ``math.inf`` allowed.
        mass: per-row sum ``S`` (shape ``p.shape[:-1]``) when the rows are ``S·q`` for a distribution
            ``q``; the entropy of ``q`` is returned without materialising ``p / S``.

    Returns:
        ``p.shape[:-1]`` entropies.
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
    else:
        # vector_norm reduces Σ p^α without an intermediate tensor: log Σ p^α = α·log ‖p‖_α.
        h = (alpha / (1.0 - alpha)) * torch.linalg.vector_norm(p, ord=alpha, dim=-1).log()
        if mass is not None:
            return h - (alpha / (1.0 - alpha)) * mass.log()
        return h
    return h if mass is None else h + mass.log()


def attention_entropy(attn: torch.Tensor, alpha: float = 1.0, num_prefix: int = 1, keys: str = "all") -> torch.Tensor:
    """Per patch token, the entropy of its attention row, per head then averaged over heads.

    Args:
        attn: post-softmax attention ``(B, H, N, N)``.
        alpha: Rényi order (1 = Shannon, ``math.inf`` = min-entropy, 0 allowed).
        num_prefix: class/distillation/register tokens at the front (not scored).
        keys: ``"all"``: the row over every key as computed; ``"patches"``: the row over patch keys
            only, renormalised.

    Returns:
        ``(B, N − num_prefix)`` scores (lower = more informative = kept).
    """
    rows = attn[:, :, num_prefix:, :]
    mass = None
    if keys == "patches":
        rows = rows[..., num_prefix:]
        mass = rows.sum(-1)
    elif keys != "all":
        raise EamError(f"entropy keys {keys!r} is not one of {', '.join(KEYS)}")
    return row_entropy(rows, alpha, mass).mean(1)


def evit_scores(attn: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """EViT's importance: the class token's attention to each patch, averaged over heads.

    Args:
        attn: post-softmax attention ``(B, H, N, N)``.
        num_prefix: prefix tokens; the class token is token 0.

    Returns:
        ``(B, N − num_prefix)`` scores (higher = kept).
    """
    return attn[:, :, 0, num_prefix:].mean(1)


def kept_count(n: int, keep_rate: float) -> int:
    """Patch tokens kept out of ``n``: ``ceil(κ·n)`` computed as EViT's code does (at least 1)."""
    return max(1, min(n, math.ceil(keep_rate * n)))


def select_tokens(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` best scores, best first (``torch.topk`` order, as EViT)."""
    return torch.topk(scores, k, dim=1, largest=largest, sorted=True).indices


def fuse_dropped(patches: torch.Tensor, weights: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """EViT's fused token ``Σ_{j dropped} x_j·w_j`` (not normalised), ``(B, 1, C)``.

    The kept positions are zeroed in the weights and one batched product runs over all patches, which
    avoids gathering the dropped tokens.

    Args:
        patches: patch tokens ``(B, n, C)``.
        weights: ``(B, n)`` fusion weights (EViT: class-token attention averaged over heads).
        keep_idx: ``(B, k)`` indices of the kept patches.
    """
    w = weights.to(patches.dtype).scatter(1, keep_idx, 0.0)
    return torch.bmm(w.unsqueeze(1), patches)


def gather_tokens(x: torch.Tensor, keep_idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Prefix tokens followed by the kept patches, in one gather: ``(B, num_prefix + k, C)``."""
    B, _, C = x.shape
    idx = keep_idx + num_prefix
    if num_prefix:
        prefix = torch.arange(num_prefix, device=x.device).expand(B, num_prefix)
        idx = torch.cat([prefix, idx], dim=1)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, C))


def token_counts(num_patches: int, keep_rate: float, stages: int, fuse: bool = False) -> list[int]:
    """Patch-token counts (fused token included) entering the model and after each stage.

    ``token_counts(196, 0.7, 3)`` = ``[196, 138, 97, 68]``; with ``fuse=True`` ``[196, 139, 99, 71]``.
    """
    counts = [num_patches]
    n = num_patches
    for _ in range(stages):
        k = kept_count(n, keep_rate)
        n = k + (1 if fuse and k < n else 0)
        counts.append(n)
    return counts


def default_blocks(depth: int) -> tuple[int, ...]:
    """EViT's 0-based (3, 6, 9) of 12 blocks, scaled: ``⌊depth·i/4⌋`` for i = 1, 2, 3 (deduplicated)."""
    return tuple(sorted({depth * i // 4 for i in (1, 2, 3)}))


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

@dataclass
class PruneConfig:
    """How to prune.

    Args:
        method: ``"shannon"``, ``"renyi"`` (order ``alpha``), ``"evit"`` or ``"random"``.
        keep_rate: κ in (0, 1]; each stage keeps ``ceil(κ·(N−1))`` patch tokens.
        alpha: Rényi order ≥ 0 (``math.inf`` = min-entropy; 1 = Shannon); used by ``"renyi"`` only.
        blocks: 0-based pruning blocks; ``None`` = EViT's (3, 6, 9) of 12 scaled to the depth.
        fuse: fuse the dropped tokens into one; ``None`` = on for EViT, off otherwise.
        placement: ``"attn"`` (after the attention residual, before the MLP; EViT) or ``"block"``
            (after the whole block).
        keys: ``"all"`` or ``"patches"`` (which keys an entropy row is over; module docstring).
        seed: seed of the ``"random"`` baseline.
        record_scores: keep each stage's scores on the model after a forward (figures, histograms).
        frozen_after: ``"drop"`` frozen EAM maps after the first pruning block, or ``"refuse"``.
    """

    method: str = "shannon"
    keep_rate: float = 0.7
    alpha: float = 2.0
    blocks: Optional[Sequence[int]] = None
    fuse: Optional[bool] = None
    placement: str = "attn"
    keys: str = "all"
    seed: int = 0
    record_scores: bool = False
    frozen_after: str = "drop"

    def validate(self) -> "PruneConfig":
        if self.method not in METHODS:
            raise EamError(f"pruning method {self.method!r} is not one of {', '.join(METHODS)}")
        check_keep_rate(self.keep_rate)
        a = self.alpha
        if not isinstance(a, (int, float)) or math.isnan(a) or a < 0:
            raise EamError(f"Rényi order alpha={a} must be ≥ 0 (e.g. 0.5, 2, 3 or inf)")
        if self.placement not in PLACEMENTS:
            raise EamError(f"pruning placement {self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if self.keys not in KEYS:
            raise EamError(f"entropy keys {self.keys!r} is not one of {', '.join(KEYS)}")
        if self.frozen_after not in FROZEN_AFTER:
            raise EamError(f"frozen_after {self.frozen_after!r} is not one of {', '.join(FROZEN_AFTER)}")
        return self

    @property
    def fuse_tokens(self) -> bool:
        return self.method == "evit" if self.fuse is None else bool(self.fuse)

    @property
    def order(self) -> Optional[float]:
        """The entropy order used (1 for Shannon), ``None`` for EViT and random."""
        return 1.0 if self.method == "shannon" else float(self.alpha) if self.method == "renyi" else None

    @property
    def label(self) -> str:
        if self.method == "renyi":
            a = "∞" if math.isinf(self.alpha) else f"{self.alpha:g}"
            return f"Rényi α={a}"
        return {"shannon": "Shannon", "evit": "EViT", "random": "random"}[self.method]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = list(self.blocks) if self.blocks is not None else None
        d["alpha"] = "inf" if math.isinf(self.alpha) else self.alpha
        return d


def check_keep_rate(keep_rate: float) -> float:
    if not isinstance(keep_rate, (int, float)) or math.isnan(keep_rate) or not 0.0 < keep_rate <= 1.0:
        raise EamError(f"keep rate {keep_rate} is outside (0, 1]; give a fraction such as 0.7")
    return float(keep_rate)


# --------------------------------------------------------------------------------------------------
# The pruning block
# --------------------------------------------------------------------------------------------------

@dataclass
class PruneState:
    """What all pruning blocks of one model share (``model.eam_prune``).

    ``keep_rate`` may be changed between forwards (the fine-tuning schedule: :func:`set_keep_rate`).
    After each forward, ``stage_idx[s]`` holds stage ``s``'s kept indices relative to its input
    patch tokens (``None``: nothing pruned), ``num_patches`` the patch count entering stage 0, and,
    with ``record_scores``, ``scores[s]`` the stage's scores.
    """

    config: PruneConfig
    blocks: tuple[int, ...]
    num_prefix: int
    grid: Optional[tuple[int, int]]
    keep_rate: float
    later_attention: list[nn.Module] = field(default_factory=list)
    stage_idx: list[Optional[torch.Tensor]] = field(default_factory=list)
    scores: list[Optional[torch.Tensor]] = field(default_factory=list)
    num_patches: int = 0
    batch: int = 0
    device: Optional[torch.device] = None
    generator: Optional[torch.Generator] = None

    @property
    def needs_attention(self) -> bool:
        return self.config.method != "random" or self.config.fuse_tokens


def token_scores(attn: Optional[torch.Tensor], config: PruneConfig, num_prefix: int, n: int, batch: int,
                 device: torch.device | str = "cpu",
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, bool]:
    """Scores ``(B, n)`` of the patch tokens for ``config.method``, and whether larger is kept."""
    if config.method == "evit":
        return evit_scores(attn, num_prefix), True
    if config.method == "random":
        return torch.rand(batch, n, generator=generator, device=device), True
    return attention_entropy(attn, config.order, num_prefix, config.keys), False


def prune_tokens(x: torch.Tensor, attn: Optional[torch.Tensor], config: PruneConfig, num_prefix: int, k: int,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pruning step on tokens ``x`` given the block's attention map.

    Args:
        x: tokens ``(B, N, C)``, prefix tokens first.
        attn: the block's post-softmax attention ``(B, H, N, N)`` (``None`` for unfused random).
        config: method, fusion and entropy options.
        num_prefix: class/distillation/register tokens (always kept, in front).
        k: patch tokens to keep.
        generator: random generator of the ``"random"`` method.

    Returns:
        ``(tokens, keep_idx, scores)``: ``(B, num_prefix + k [+ 1 fused], C)``, ``(B, k)`` indices
        into the input patch tokens (best first) and the ``(B, N − num_prefix)`` scores.
    """
    B, N, _ = x.shape
    scores, largest = token_scores(attn, config, num_prefix, N - num_prefix, B, x.device, generator)
    keep = select_tokens(scores, k, largest)
    out = gather_tokens(x, keep, num_prefix)
    if config.fuse_tokens:
        out = torch.cat([out, fuse_dropped(x[:, num_prefix:], evit_scores(attn, num_prefix), keep)], dim=1)
    return out, keep, scores


class PruneBlock(Block):
    """timm ``Block`` that drops patch tokens; installed by class swap from :func:`prune_`."""

    eam_prune: PruneState
    eam_stage: int

    def _attention(self, x: torch.Tensor, attn_mask, is_causal) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention output, and its map when the method needs one (through the observer hook)."""
        if not self.eam_prune.needs_attention:
            return self.attn(x, attn_mask=attn_mask, is_causal=is_causal), None
        seen: list[torch.Tensor] = []
        with observe(self, {0: lambda attn, mask: seen.append(attn)}):
            out = self.attn(x, attn_mask=attn_mask, is_causal=is_causal)
        return out, seen[0]

    def _prune(self, x: torch.Tensor, attn: Optional[torch.Tensor], k: int) -> torch.Tensor:
        st = self.eam_prune
        gen = None
        if st.config.method == "random":
            if st.generator is None or st.generator.device != x.device:
                st.generator = torch.Generator(device=x.device).manual_seed(st.config.seed)
            gen = st.generator
        out, keep, scores = prune_tokens(x, attn, st.config, st.num_prefix, k, gen)
        st.stage_idx[self.eam_stage] = keep
        if st.config.record_scores:
            st.scores[self.eam_stage] = scores.detach()
        return out

    def _check_frozen(self) -> None:
        for module in self.eam_prune.later_attention:
            if module.eam_frozen_mask is not None:
                raise EamError(f"attention layer {module.eam_layer} has frozen EAM maps but comes after token "
                               f"pruning at block {self.eam_prune.blocks[0]}; freeze before pruning (prune_ drops "
                               "maps that no longer apply) or unfreeze those layers")

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        st = self.eam_prune
        n = x.shape[1] - st.num_prefix
        if self.eam_stage == 0:
            # Stage 0 runs first in every forward: start a fresh trace.
            st.num_patches, st.batch, st.device = n, x.shape[0], x.device
            st.stage_idx = [None] * len(st.blocks)
            st.scores = [None] * len(st.blocks)
        k = kept_count(n, st.keep_rate)
        if k >= n or attn_mask is not None:
            # Nothing to drop (or a caller-given mask sized for all tokens): timm's own, fused forward.
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.eam_stage == 0 and st.later_attention:
            self._check_frozen()
        y, attn = self._attention(self.norm1(x), attn_mask, is_causal)
        x = x + self.drop_path1(self.ls1(y))
        if st.config.placement == "attn":
            x = self._prune(x, attn, k)
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return self._prune(x, attn, k)


# --------------------------------------------------------------------------------------------------
# Applying pruning to a model
# --------------------------------------------------------------------------------------------------

@dataclass
class PruneReport:
    """What :func:`prune_` did: the pruning blocks, tokens per stage at the model's own image size
    (patch tokens, fused token included), and attention layers whose frozen EAM maps were removed."""

    config: dict[str, Any]
    blocks: list[int]
    tokens_per_stage: list[int]
    unfrozen_layers: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_model(model: nn.Module) -> nn.Sequential:
    from timm.models.swin_transformer import SwinTransformerBlock

    if any(isinstance(m, SwinTransformerBlock) for m in model.modules()):
        raise EamError("token pruning does not support Swin: its windowed attention needs the full token grid and has "
                       "no class token; use a ViT/DeiT model")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks):
        raise EamError(f"token pruning needs a timm VisionTransformer (ViT/DeiT) with .blocks; "
                       f"{type(model).__name__} has none")
    bad = [type(b).__name__ for b in blocks if type(b) not in (Block, PruneBlock)]
    if bad:
        raise EamError(f"token pruning supports timm ViT/DeiT blocks (timm Block); this model has {bad[0]}")
    if num_prefix_tokens(model) < 1 or getattr(model, "global_pool", "token") == "map":
        raise EamError("token pruning needs a class token (EViT scores and the prediction read it); "
                       "this model has none or pools with attention")
    return blocks


def _resolve_blocks(config: PruneConfig, depth: int) -> tuple[int, ...]:
    blocks = default_blocks(depth) if config.blocks is None else tuple(config.blocks)
    if not blocks:
        raise EamError("no pruning blocks given; name at least one 0-based block")
    for b in blocks:
        if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < depth:
            raise EamError(f"pruning block {b} is outside the model's {depth} blocks (0-based 0..{depth - 1})")
    if len(set(blocks)) != len(blocks):
        raise EamError(f"pruning blocks {list(blocks)} repeat a block")
    return tuple(sorted(blocks))


def prune_(model: nn.Module, config: PruneConfig) -> PruneReport:
    """Make ``model`` prune patch tokens, in place (no weights change; :func:`unprune_` undoes it).

    Args:
        model: a timm ViT/DeiT (``create_model`` instruments it; plain timm models are instrumented).
        config: :class:`PruneConfig`.

    Returns:
        A :class:`PruneReport`.

    Raises:
        EamError: a bad configuration or an unsupported model (one line).
    """
    config.validate()
    blocks_seq = _check_model(model)
    blocks = _resolve_blocks(config, len(blocks_seq))
    unprune_(model)
    layers = instrument(model)
    first = blocks[0]
    # Attention layers after the first pruning block see fewer tokens than their frozen maps describe.
    by_block = {id(b.attn): i for i, b in enumerate(blocks_seq)}
    later = [m for m in layers if by_block.get(id(m), -1) > first]
    # κ = 1 prunes nothing, so the model (frozen maps included) stays exactly as it was; raising κ
    # later with set_keep_rate meets the check at the first forward that prunes.
    frozen_later = [m.eam_layer for m in later if m.eam_frozen_mask is not None] if config.keep_rate < 1 else []
    if frozen_later and config.frozen_after == "refuse":
        raise EamError(f"attention layers {frozen_later} have frozen EAM maps after the first pruning block {first}; "
                       "frozen maps cannot follow pruned tokens (unfreeze them, or use frozen_after='drop')")
    for m in later:
        if m.eam_layer in frozen_later:
            m.eam_frozen_mask = None
            m.eam_frozen_values = None
    state = PruneState(config=config, blocks=blocks, num_prefix=num_prefix_tokens(model), grid=patch_grid(model),
                       keep_rate=float(config.keep_rate), later_attention=later)
    for stage, b in enumerate(blocks):
        blk = blocks_seq[b]
        blk.__class__ = PruneBlock
        blk.eam_prune = state
        blk.eam_stage = stage
    model.eam_prune = state
    grid = state.grid
    n0 = grid[0] * grid[1] if grid else 0
    return PruneReport(config=config.to_dict(), blocks=list(blocks),
                       tokens_per_stage=token_counts(n0, config.keep_rate, len(blocks), config.fuse_tokens),
                       unfrozen_layers=frozen_later)


def unprune_(model: nn.Module) -> None:
    """Restore every pruning block to timm's ``Block`` and forget the pruning state."""
    for m in model.modules():
        if type(m) is PruneBlock:
            m.__class__ = Block
            for attr in ("eam_prune", "eam_stage"):
                m.__dict__.pop(attr, None)
    model.__dict__.pop("eam_prune", None)


def prune_state(model: nn.Module) -> PruneState:
    st = getattr(model, "eam_prune", None)
    if st is None:
        raise EamError("this model is not pruned; call prune_(model, PruneConfig(...)) first")
    return st


def set_keep_rate(model: nn.Module, keep_rate: float) -> None:
    """Change κ of a pruned model (e.g. the fine-tuning schedule); κ = 1 runs the unpruned model."""
    prune_state(model).keep_rate = check_keep_rate(keep_rate)


def trace_indices(stage_idx: Sequence[Optional[torch.Tensor]], num_patches: int, fuse: bool, batch: int = 1,
                  device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Compose per-stage kept indices (relative to each stage's input) into original patch indices.

    Args:
        stage_idx: per stage, ``(B, k_s)`` indices into that stage's input patch tokens, or ``None``
            where the stage kept everything.
        num_patches: patch tokens entering the first stage (the original grid, row-major).
        fuse: whether each pruning stage appended a fused token (its index is ``-1``).
        batch: batch size (used when no stage pruned).
        device: device of the result when no stage pruned.

    Returns:
        Per stage, ``(B, n_s)`` original indices of the tokens leaving it, in token order.
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


def kept_indices(model: nn.Module) -> list[torch.Tensor]:
    """After a forward: per stage, ``(B, n_s)`` indices into the original patch grid (row-major) of
    the patch tokens leaving that stage, in token order; ``-1`` marks the fused token."""
    st = prune_state(model)
    if not st.stage_idx:
        raise EamError("run a forward pass of the pruned model before asking for kept indices")
    return trace_indices(st.stage_idx, st.num_patches, st.config.fuse_tokens, st.batch, st.device)


def kept_masks(model: nn.Module) -> list[torch.Tensor]:
    """After a forward: per stage, ``(B, gh, gw)`` booleans of the original patches still present."""
    st = prune_state(model)
    if st.grid is None or st.grid[0] * st.grid[1] != st.num_patches:
        raise EamError("kept masks need the model's own patch grid (run at the image size it was created for)")
    masks = []
    for idx in kept_indices(model):
        m = torch.zeros(idx.shape[0], st.num_patches + 1, dtype=torch.bool, device=idx.device)
        m.scatter_(1, torch.where(idx < 0, st.num_patches, idx), True)  # fused (-1) lands in a spare slot
        masks.append(m[:, :-1].reshape(idx.shape[0], *st.grid))
    return masks


# --------------------------------------------------------------------------------------------------
# Cost: FLOPs and throughput
# --------------------------------------------------------------------------------------------------

def _input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> tuple[int, int, int]:
    if input_size is not None:
        return tuple(int(s) for s in input_size)  # type: ignore[return-value]
    from eamvit.methods.models import data_config

    return tuple(data_config(model)["input_size"])  # type: ignore[return-value]


@torch.inference_mode()
def measure_throughput(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 32,
                       warmup: int = 2, iters: int = 5, device: torch.device | str | None = None,
                       stat: str = "median") -> float:
    """Images per second of ``model`` on random inputs (inference mode, eval).

    Args:
        model: the model.
        input_size: ``(C, H, W)``; the model's own by default.
        batch_size: images per forward.
        warmup: untimed forwards first.
        iters: timed forwards.
        device: where to run (the model's device by default).
        stat: ``"median"`` or ``"best"`` of the per-forward times (best resists other load on the
            machine).
    """
    import statistics
    import time

    if stat not in ("median", "best"):
        raise EamError(f"throughput statistic {stat!r} is not 'median' or 'best'")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    x = torch.randn(batch_size, *_input_size(model, input_size), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - t0)
    t = min(times) if stat == "best" else statistics.median(times)
    return batch_size / t


# --------------------------------------------------------------------------------------------------
# Entropy distributions (the seed's Fig. 5)
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def token_entropies(model: nn.Module, images: torch.Tensor, alphas: Sequence[float] = (1.0, 2.0),
                    layers: Optional[Sequence[int]] = None, keys: str = "all") -> dict[float, list[torch.Tensor]]:
    """Per-token attention entropies (averaged over heads) of every patch token at each layer.

    Runs one forward with observers on the chosen attention layers (they chain with a pruned
    model's own capture, so a pruned model shows the tokens each block really saw).

    Args:
        model: a timm ViT/DeiT (pruned or not).
        images: a batch ``(B, C, H, W)``.
        alphas: Rényi orders (1 = Shannon, ``math.inf`` = min-entropy).
        layers: attention layers (0-based); all by default.
        keys: ``"all"`` or ``"patches"`` (see :func:`attention_entropy`).

    Returns:
        ``{alpha: [layer tensors of shape (B·n_l,)]}`` in the order of ``layers``.
    """
    mods = attention_layers(model)
    layers = list(range(len(mods))) if layers is None else list(layers)
    for l in layers:
        if not 0 <= l < len(mods):
            raise EamError(f"layer {l} is outside the model's {len(mods)} attention layers")
    P = num_prefix_tokens(model)
    out: dict[float, dict[int, torch.Tensor]] = {float(a): {} for a in alphas}

    def make(l: int):
        def obs(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
            for a in out:
                out[a][l] = attention_entropy(attn.detach(), a, P, keys).reshape(-1).cpu()
        return obs

    was_training = model.training
    model.eval()
    try:
        with observe(model, {l: make(l) for l in layers}):
            model(images.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    return {a: [per[l] for l in layers] for a, per in out.items()}


# --------------------------------------------------------------------------------------------------
# Sweeps and the demo table
# --------------------------------------------------------------------------------------------------

KEEP_RATES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
SWEEP_METHODS: tuple[tuple[str, Optional[float]], ...] = (
    ("shannon", None), ("renyi", 0.5), ("renyi", 2.0), ("renyi", 3.0), ("renyi", math.inf), ("evit", None),
    ("random", None))


def method_config(method: str, alpha: Optional[float], keep_rate: float, **options: Any) -> PruneConfig:
    """A :class:`PruneConfig` for one (method, α) of a sweep."""
    kw = dict(options)
    if alpha is not None:
        kw["alpha"] = alpha
    return PruneConfig(method=method, keep_rate=keep_rate, **kw).validate()


def parse_methods(text: str) -> list[tuple[str, Optional[float]]]:
    """``"shannon,renyi:0.5,renyi:2,renyi:inf,evit,random"`` → ``[(method, alpha), ...]``."""
    out: list[tuple[str, Optional[float]]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, a = part.partition(":")
        name = name.strip().lower()
        try:
            alpha = (math.inf if a.strip().lower() in ("inf", "∞") else float(a)) if a else None
        except ValueError:
            raise EamError(f"cannot read Rényi order {a!r} in {part!r}; write e.g. renyi:2 or renyi:inf") from None
        if name == "renyi" and alpha is None:
            raise EamError(f"method {part!r} needs an order, e.g. renyi:2")
        method_config(name, alpha, 0.7)  # validates name and alpha
        out.append((name, alpha))
    if not out:
        raise EamError("no pruning methods given; e.g. shannon,renyi:2,evit,random")
    return out


def _cost_row(model: nn.Module, input_size, throughput: bool, throughput_batch: int, throughput_iters: int,
              device) -> dict[str, Any]:
    from eamvit.methods.cost import count_gflops

    row: dict[str, Any] = {"gflops": round(count_gflops(model, input_size, device=device), 4)}
    if throughput:
        row["images_per_s"] = round(measure_throughput(model, input_size, throughput_batch, warmup=1,
                                                       iters=throughput_iters, device=device, stat="best"), 2)
    return row


def prune_sweep(model: nn.Module, dataset, keep_rates: Sequence[float] = KEEP_RATES,
                methods: Sequence[tuple[str, Optional[float]]] = SWEEP_METHODS, indices: Optional[Sequence[int]] = None,
                batch_size: int = 64, workers: int = 0, device: torch.device | str | None = None,
                throughput: bool = True, throughput_batch: int = 32, throughput_iters: int = 3,
                progress: bool = True, label: str = "", **options: Any) -> list[dict[str, Any]]:
    """Top-1, GFLOPs and images/s for every (method, κ), off the shelf (no fine-tuning).

    The first row is the unpruned model (``method="none"``, κ = 1). The model is left unpruned.

    Args:
        model: a timm ViT/DeiT.
        dataset: evaluation dataset (items ``(image, target)``).
        keep_rates: κ values.
        methods: ``(method, alpha)`` pairs (alpha ``None`` except for ``"renyi"``).
        indices: evaluation subset.
        batch_size: evaluation batch size.
        workers: DataLoader workers.
        device: where to run.
        throughput: also measure images/s (random inputs, ``throughput_batch`` images, best of
            ``throughput_iters`` forwards).
        progress: progress bar.
        label: copied into every row.
        **options: further :class:`PruneConfig` fields (``blocks``, ``placement``, ``keys``, ``fuse``).

    Returns:
        Rows with ``label, method, alpha, keep_rate, top1, top5, gflops, images_per_s, tokens,
        blocks, placement, fuse``.
    """
    from tqdm.auto import tqdm

    from eamvit.methods.evaluate import evaluate

    for k in keep_rates:
        check_keep_rate(k)
    jobs = [(m, a, k) for k in keep_rates for m, a in methods]
    for m, a, k in jobs:
        method_config(m, a, k, **options)  # every bad option fails before any work
    input_size = _input_size(model, None)
    grid = patch_grid(model)
    n0 = grid[0] * grid[1] if grid else 0
    rows: list[dict[str, Any]] = []
    unprune_(model)
    bar = tqdm(total=len(jobs) + 1, desc=f"prune sweep {label}".strip(), unit="point", disable=not progress,
               dynamic_ncols=True)
    try:
        base = evaluate(model, dataset, indices, batch_size=batch_size, workers=workers, device=device, progress=False)
        rows.append({"label": label, "method": "none", "alpha": None, "keep_rate": 1.0, "top1": base["top1"],
                     "top5": base["top5"], **_cost_row(model, input_size, throughput, throughput_batch,
                                                        throughput_iters, device),
                     "tokens": str(n0), "blocks": "", "placement": "", "fuse": False})
        bar.update(1)
        for m, a, k in jobs:
            cfg = method_config(m, a, k, **options)
            bar.set_postfix(method=cfg.label, keep=k)
            report = prune_(model, cfg)
            met = evaluate(model, dataset, indices, batch_size=batch_size, workers=workers, device=device,
                           progress=False)
            rows.append({"label": label, "method": m, "alpha": cfg.order if m == "renyi" else None,
                         "keep_rate": k, "top1": met["top1"], "top5": met["top5"],
                         **_cost_row(model, input_size, throughput, throughput_batch, throughput_iters, device),
                         "tokens": "-".join(map(str, report.tokens_per_stage)),
                         "blocks": "-".join(map(str, report.blocks)), "placement": cfg.placement,
                         "fuse": cfg.fuse_tokens})
            bar.update(1)
    finally:
        bar.close()
        unprune_(model)
    for r in rows:
        if isinstance(r["alpha"], float) and math.isinf(r["alpha"]):
            r["alpha"] = "inf"  # JSON has no infinity
    return rows


def row_label(row: dict[str, Any]) -> str:
    """Display name of a sweep row's method."""
    m = row["method"]
    if m == "renyi":
        a = row["alpha"]
        return f"Rényi α={'∞' if a in ('inf', math.inf) else f'{float(a):g}'}"
    return {"shannon": "Shannon", "evit": "EViT", "random": "random", "none": "unpruned"}.get(m, m)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of sweep rows (Δ top-1 against the unpruned row when there is one)."""
    base = next((r for r in rows if r["method"] == "none"), None)
    ft = any("top1_finetuned" in r for r in rows)
    head = ["method", "κ", "tokens per stage", "top-1 (%)", "Δ top-1", "GFLOPs", "images/s"]
    if ft:
        head.append("top-1 fine-tuned (%)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = f"{r['top1'] - base['top1']:+.2f}" if base is not None and r is not base else ""
        ips = r.get("images_per_s")
        cells = [row_label(r), f"{r['keep_rate']:g}", str(r["tokens"]).replace("-", "→"), f"{r['top1']:.2f}", delta,
                 f"{r['gflops']:.4f}" if r["gflops"] < 0.1 else f"{r['gflops']:.2f}",
                 f"{ips:.0f}" if ips is not None else ""]
        if ft:
            v = r.get("top1_finetuned")
            cells.append(f"{v:.2f}" if v is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def prune_table(model: nn.Module, train_ds, test_ds, keep_rates: Sequence[float] = (0.7, 0.5),
                methods: Sequence[tuple[str, Optional[float]]] = (("shannon", None), ("renyi", 2.0), ("evit", None),
                                                                   ("random", None)),
                finetune_epochs: int = 0, finetune_lr: float = 1e-4, batch_size: int = 256,
                device: torch.device | str | None = None, progress: bool = True,
                throughput_batch: int = 64) -> tuple[list[dict[str, Any]], str]:
    """The demo's pruning table: off-the-shelf top-1, GFLOPs and images/s per (method, κ).

    Args:
        model: the trained model (left unchanged and unpruned).
        train_ds: training split, used only when ``finetune_epochs > 0``.
        test_ds: held-out split for top-1.
        keep_rates: κ values.
        methods: ``(method, alpha)`` pairs.
        finetune_epochs: if > 0, each row is also fine-tuned (a copy of the model, the EViT recipe
            with this many epochs and ``finetune_lr``) and ``top1_finetuned`` is added.
        finetune_lr: peak learning rate of those fine-tunes.
        batch_size: evaluation batch size.
        device: where to run.
        progress: progress bars.
        throughput_batch: images per timed forward.

    Returns:
        ``(rows, markdown)``.
    """
    rows = prune_sweep(model, test_ds, keep_rates, methods, batch_size=batch_size, device=device,
                       throughput_batch=throughput_batch, progress=progress, label="off the shelf")
    if finetune_epochs > 0:
        import copy

        from eamvit.methods.evaluate import evaluate
        from eamvit.methods.finetune import FinetuneConfig, finetune

        ftc = FinetuneConfig(epochs=finetune_epochs, lr=finetune_lr, min_lr=finetune_lr / 10, batch_size=64)
        for r in rows:
            if r["method"] == "none":
                continue
            alpha = math.inf if r["alpha"] == "inf" else r["alpha"]
            m = copy.deepcopy(model)
            prune_(m, method_config(r["method"], alpha, r["keep_rate"]))
            finetune(m, train_ds, ftc, progress=progress, device=device)
            r["top1_finetuned"] = evaluate(m, test_ds, batch_size=batch_size, device=device, progress=False)["top1"]
    return rows, markdown_table(rows)
