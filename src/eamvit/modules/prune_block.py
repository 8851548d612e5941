"""The pruning block: timm's ``Block`` that drops patch tokens, installed by class swap.

:func:`eamvit.methods.prune.prune_` swaps chosen ``Block`` objects for :class:`PruneBlock`
(ToMe-style; no weights copied, no per-instance ``forward``, no module-name matching). A pruning block
reads its attention map through the one instrumentation, :func:`eamvit.modules.attention.observe`,
around its own attention call only, so only pruning blocks materialise ``A``; every other block, and a
pruning block with nothing to prune (κ = 1, or unfused ``random``), runs timm's fused attention.

``placement="attn"`` prunes after the attention residual, before ``norm2``/MLP (EViT's code);
``"block"`` after the whole block. The captured map is the live tensor, so, as in EViT, gradients
flow through the fusion weights as well as through the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from timm.models.vision_transformer import Block

from eamvit.errors import EamError
from eamvit.modules.attention import observe
from eamvit.ops.scores import kept_count, prune_tokens


@dataclass
class PruneState:
    """What all pruning blocks of one model share (``model.eam_prune``).

    The scoring fields are copied from the :class:`~eamvit.methods.prune.PruneConfig` kept in
    ``config``. ``keep_rate`` may change between forwards (the fine-tuning schedule). After each
    forward, ``stage_idx[s]`` holds stage ``s``'s kept indices relative to its input patch tokens
    (``None``: nothing pruned), ``num_patches`` the patch count entering stage 0, and, with
    ``record_scores``, ``scores[s]`` the stage's scores.
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

    @property
    def needs_attention(self) -> bool:
        return self.method != "random" or self.fuse


class PruneBlock(Block):
    """timm ``Block`` that drops patch tokens; installed by class swap."""

    eam_prune: PruneState
    eam_stage: int

    def _attention(self, x: torch.Tensor, attn_mask, is_causal) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention output, and its map when the method needs one (read through ``observe``)."""
        if not self.eam_prune.needs_attention:
            return self.attn(x, attn_mask=attn_mask, is_causal=is_causal), None
        seen: list[torch.Tensor] = []
        with observe(self, {0: lambda attn, mask: seen.append(attn)}):
            out = self.attn(x, attn_mask=attn_mask, is_causal=is_causal)
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
        if st.placement == "attn":
            x = self._prune(x, attn, k)
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return self._prune(x, attn, k)
