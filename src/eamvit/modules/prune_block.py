"""The pruning blocks: each flat-token family's timm block that drops patch tokens, installed by class swap.

:func:`eamvit.methods.prune.prune_` swaps chosen blocks for their family's pruning class (the adapter's
:class:`~eamvit.modules.adapters.TokenFamily` names it; ToMe-style; no weights copied, no per-instance
``forward``, no module-name matching): ``Block`` (ViT, DeiT III, DINOv2, CLIP, NaFlexViT) →
:class:`PruneBlock`, EVA02's ``EvaBlock``, BEiT's ``Block``, CaiT's self-attention ``LayerScaleBlock``
and ConViT's MHSA ``Block``. A pruning block reads its attention map through the one instrumentation
(:func:`~eamvit.modules.adapters.observing`, as :func:`eamvit.modules.attention.observe` does), around
its own attention call only, so only pruning blocks materialise ``A``; every other block, and a
pruning block with nothing to prune (κ = 1, or unfused ``random``), runs timm's fused attention.

``placement="attn"`` prunes after the attention residual, before ``norm2``/MLP (EViT's code);
``"block"`` after the whole block. The captured map is the live tensor, so, as in EViT, gradients
flow through the fusion weights as well as through the tokens.

Positions. EVA02 rotates q and k by each patch's RoPE and BEiT adds a relative-position bias indexed
by token pairs; both are computed for the full grid. Every block of those families after the first
pruning block (pruning or not: a *follower*, ``eam_stage = None``) therefore gathers them for the tokens
still present, from ``PruneState.positions``. EViT's fused token has no grid position: it gets no
rotation and no relative-position bias (zero), as the class token gets no rotation in EVA02.
CaiT's self-attention blocks run before its class token exists, so there ``num_prefix`` is 0 and
only the entropy and random scores apply (no class-token attention for EViT or its fusion).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from timm.models import beit, cait, convit, eva
from timm.models.vision_transformer import Block

from eamvit.errors import EamError
from eamvit.modules.adapters import observing
from eamvit.ops.positions import gather_pair_bias, gather_rope, next_positions
from eamvit.ops.scores import kept_count, prune_tokens


@dataclass
class PruneState:
    """What all pruning blocks of one model share (``model.eam_prune``).

    The scoring fields are copied from the :class:`~eamvit.methods.prune.PruneConfig` kept in
    ``config``. ``keep_rate`` may change between forwards (the fine-tuning schedule). After each
    forward, ``stage_idx[s]`` holds stage ``s``'s kept indices relative to its input patch tokens
    (``None``: nothing pruned), ``num_patches`` the patch count entering stage 0, and, with
    ``record_scores``, ``scores[s]`` the stage's scores. With ``track_positions`` (EVA02, BEiT),
    ``positions`` is ``(B, N_now)``: each present token's index among the tokens entering stage 0
    (prefix tokens first; ``-1`` for a fused token), or ``None`` while no stage of this forward pruned.
    """

    config: Any
    method: str
    order: float
    keys: str
    fuse: bool
    placement: str
    seed: int
    record_scores: bool
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
    track_positions: bool = False
    positions: Optional[torch.Tensor] = None


    @property
    def needs_attention(self) -> bool:
        return self.method != "random" or self.fuse



class _PruneMixin:
    """What every family's pruning block shares: the per-forward trace, the attention capture and the
    token surgery. ``eam_stage`` is the pruning stage, or ``None`` for a follower block that only
    needs the present tokens' positions."""

    eam_prune: PruneState
    eam_stage: Optional[int]

    def _eam_start(self, x: torch.Tensor) -> Optional[int]:
        """Patch tokens to keep at this block, or ``None`` when it prunes nothing in this forward."""
        st = self.eam_prune
        n = x.shape[1] - st.num_prefix
        if self.eam_stage == 0:
            # Stage 0 runs first in every forward: start a fresh trace.
            st.num_patches, st.batch, st.device = n, x.shape[0], x.device
            st.stage_idx = [None] * len(st.blocks)
            st.scores = [None] * len(st.blocks)
            st.positions = None
        if self.eam_stage is None:
            return None
        k = kept_count(n, st.keep_rate)
        if k >= n:
            return None
        if self.eam_stage == 0 and st.later_attention:
            self._check_frozen()
        return k

    def _attention(self, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``run()`` (the attention branch), and the map when the method needs one (read through ``observe``)."""
        if not self.eam_prune.needs_attention:
            return run(), None
        seen: list[torch.Tensor] = []
        with observing([self.attn], {0: lambda attn, mask: seen.append(attn)}):
            out = run()
        return out, seen[0]

    def _prune(self, x: torch.Tensor, attn: Optional[torch.Tensor], k: int) -> torch.Tensor:
        st = self.eam_prune
        gen = None
        if st.method == "random":
            if st.generator is None or st.generator.device != x.device:
                st.generator = torch.Generator(device=x.device).manual_seed(st.seed)
            gen = st.generator
        out, keep, scores = prune_tokens(x, attn, st.method, st.num_prefix, k, st.order, st.keys, st.fuse, gen)
        st.stage_idx[self.eam_stage] = keep
        if st.record_scores:
            st.scores[self.eam_stage] = scores.detach()
        if st.track_positions:
            st.positions = next_positions(st.positions, keep, st.num_prefix, x.shape[1], st.fuse)
        return out

    def _check_frozen(self) -> None:
        for module in self.eam_prune.later_attention:
            if module.eam_frozen_mask is not None:
                raise EamError(f"attention layer {module.eam.layer} has frozen EAM maps but comes after token "
                               f"pruning at block {self.eam_prune.blocks[0]}; freeze before pruning (prune_ drops "
                               "maps that no longer apply) or unfreeze those layers")

    def _eam_run(self, x: torch.Tensor, k: int, attn_branch: Callable[[torch.Tensor], torch.Tensor],
                 mlp_branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The block with pruning: ``x + attn_branch(x)``, then prune before (``"attn"``) or after
        (``"block"``) ``x + mlp_branch(x)``; each branch is the family's own arithmetic."""
        y, attn = self._attention(lambda: attn_branch(x))
        x = x + y
        if self.eam_prune.placement == "attn":
            x = self._prune(x, attn, k)
            return x + mlp_branch(x)
        x = x + mlp_branch(x)
        return self._prune(x, attn, k)


class PruneBlock(_PruneMixin, Block):
    """timm ``Block`` (ViT family) that drops patch tokens; installed by class swap."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        k = self._eam_start(x)
        if k is None or attn_mask is not None:
            # Nothing to drop (or a caller-given mask sized for all tokens): timm's own, fused forward.
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self._eam_run(x, k, lambda t: self.drop_path1(self.ls1(self.attn(self.norm1(t), attn_mask=None,
                                                                                  is_causal=is_causal))),
                             lambda t: self.drop_path2(self.ls2(self.mlp(self.norm2(t)))))


class PruneEvaBlock(_PruneMixin, eva.EvaBlock):
    """EVA02's ``EvaBlock`` that drops patch tokens; after the first pruning stage it rotates q and k by the
    present tokens' RoPE."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        k = self._eam_start(x)
        st = self.eam_prune
        if rope is not None and st.positions is not None:
            rope = gather_rope(rope, st.positions, st.num_prefix)
        if k is None or attn_mask is not None:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)

        def attn_branch(t: torch.Tensor) -> torch.Tensor:
            y = self.attn(self.norm1(t), rope=rope, attn_mask=None, is_causal=is_causal)
            return self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y)

        def mlp_branch(t: torch.Tensor) -> torch.Tensor:
            y = self.mlp(self.norm2(t))
            return self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)

        return self._eam_run(x, k, attn_branch, mlp_branch)


class PruneBeitBlock(_PruneMixin, beit.Block):
    """BEiT's ``Block`` that drops patch tokens; after the first pruning stage its relative-position bias
    (own table and the model's shared one) covers the present tokens only."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        k = self._eam_start(x)
        positions = self.eam_prune.positions
        if positions is not None and shared_rel_pos_bias is not None:
            shared_rel_pos_bias = gather_pair_bias(shared_rel_pos_bias, positions)
        self.attn.eam.positions = positions
        try:
            if k is None:
                return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
            g1, g2 = self.gamma_1, self.gamma_2

            def attn_branch(t: torch.Tensor) -> torch.Tensor:
                y = self.attn(self.norm1(t), shared_rel_pos_bias=shared_rel_pos_bias)
                return self.drop_path1(y if g1 is None else g1 * y)

            def mlp_branch(t: torch.Tensor) -> torch.Tensor:
                y = self.mlp(self.norm2(t))
                return self.drop_path2(y if g2 is None else g2 * y)

            return self._eam_run(x, k, attn_branch, mlp_branch)
        finally:
            self.attn.eam.positions = None


class PruneCaitBlock(_PruneMixin, cait.LayerScaleBlock):
    """CaiT's self-attention ``LayerScaleBlock`` (before the class token exists) that drops patch tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._eam_start(x)
        if k is None:
            return super().forward(x)
        return self._eam_run(x, k, lambda t: self.drop_path(self.gamma_1 * self.attn(self.norm1(t))),
                             lambda t: self.drop_path(self.gamma_2 * self.mlp(self.norm2(t))))


class PruneConvitBlock(_PruneMixin, convit.Block):
    """ConViT's ``Block`` with plain multi-head self-attention (after the GPSA blocks) that drops patch tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._eam_start(x)
        if k is None:
            return super().forward(x)
        return self._eam_run(x, k, lambda t: self.drop_path(self.attn(self.norm1(t))),
                             lambda t: self.drop_path(self.mlp(self.norm2(t))))
