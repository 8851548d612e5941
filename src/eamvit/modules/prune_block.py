"""The pruning blocks: each flat-token family's timm block that drops patch tokens, installed by class swap.
See docs/architecture-modules.md."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from eamvit.modules.adapters import observing
from eamvit.modules.token_blocks import TokenBlock, block_classes
from eamvit.ops.positions import next_positions
from eamvit.ops.scores import class_attention, entropy_from_qk, kept_count, prune_tokens, stage_value


@dataclass
class PruneState:
    """What all pruning blocks of one model share (``model.eam_prune``).

    The scoring fields are copied from the :class:`~eamvit.methods.prune.PruneConfig` kept in ``config``.
    ``keep_rate`` and ``order`` are one number or one per stage; ``keep_rate`` may change between forwards
    (the fine-tuning schedule). After each forward, ``stage_idx[s]`` holds stage ``s``'s kept indices relative
    to its input patch tokens (``None``: nothing pruned), ``num_patches`` the patch count entering stage 0,
    and, with ``record_scores``, ``scores[s]`` the stage's scores. With ``track_positions`` (EVA02, BEiT),
    ``positions`` is ``(B, N_now)``: each present token's index among the tokens entering stage 0
    (prefix tokens first; ``-1`` for a fused token), or ``None`` while no stage of this forward pruned.
    """

    config: Any
    method: str
    order: float | tuple[float, ...]
    keys: str
    fuse: bool
    placement: str
    seed: int
    record_scores: bool
    blocks: tuple[int, ...]
    num_prefix: int
    grid: Optional[tuple[int, int]]
    keep_rate: float | tuple[float, ...]
    later_attention: list[nn.Module] = field(default_factory=list)
    stage_idx: list[Optional[torch.Tensor]] = field(default_factory=list)
    scores: list[Optional[torch.Tensor]] = field(default_factory=list)
    num_patches: int = 0
    batch: int = 0
    device: Optional[torch.device] = None
    generator: Optional[torch.Generator] = None
    track_positions: bool = False
    positions: Optional[torch.Tensor] = None
    scores_from_qk: bool = False  # the export form: see TokenBlock._eam_reads_qk

    @property
    def needs_attention(self) -> bool:
        return self.method != "random" or self.fuse


class _PruneSteps(TokenBlock):
    """What every family's pruning block shares: the per-forward trace, the attention capture, the surgery."""

    eam_tokens: PruneState
    eam_verb = "token pruning"

    def _eam_start(self, x: torch.Tensor, masked: bool) -> Optional[int]:
        """Patch tokens to keep at this block, or ``None`` when it prunes nothing in this forward."""
        st = self.eam_tokens
        n = x.shape[1] - st.num_prefix
        if self.eam_stage == 0:
            # Stage 0 runs first in every forward: start a fresh trace.
            st.num_patches, st.batch, st.device = n, x.shape[0], x.device
            st.stage_idx, st.scores, st.positions = [None] * len(st.blocks), [None] * len(st.blocks), None
        if self.eam_stage is None:
            return None
        k = kept_count(n, stage_value(st.keep_rate, self.eam_stage))
        if k >= n:
            return None
        if st.later_attention:  # every pruning stage: with one κ per stage, stage 0 may keep all
            self._check_frozen()
        return k

    def _eam_attend(self, k: int, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """``run()`` (the attention branch), and ``(map, scores)`` when the method needs the map: the whole map
        and no scores, or, in the export form, the class-token row and the entropies from q and k."""
        st = self.eam_tokens
        if not st.needs_attention:
            return run(), (None, None)
        if self._eam_reads_qk():
            qk: list[tuple[torch.Tensor, torch.Tensor]] = []
            with observing([self.attn], {0: lambda q, keys: qk.append((q, keys))}, "observer_qk"):
                out = run()
            q, keys = qk[0]
            scale = self.attn.scale
            scores = None if st.method in ("evit", "random") else \
                entropy_from_qk(q, keys, scale, stage_value(st.order, self.eam_stage), st.num_prefix, st.keys)
            cls_row = class_attention(q, keys, scale) if st.method == "evit" or st.fuse else None
            return out, (cls_row, scores)
        seen: list[torch.Tensor] = []
        with observing([self.attn], {0: lambda attn, mask: seen.append(attn)}):
            out = run()
        return out, (seen[0], None)

    def _eam_reads_qk(self) -> bool:
        """:meth:`TokenBlock._eam_reads_qk`, where no bias changes the map and a class token exists (EViT's row)."""
        return super()._eam_reads_qk() and self.attn.eam.score_bias is None and self.eam_tokens.num_prefix > 0

    def _eam_reduce(self, x: torch.Tensor, seen: Any, k: int) -> torch.Tensor:
        attn, scores = seen
        st = self.eam_tokens
        if st.method == "random" and (st.generator is None or st.generator.device != x.device):
            st.generator = torch.Generator(device=x.device).manual_seed(st.seed)
        out, keep, scores = prune_tokens(x, attn, st.method, st.num_prefix, k, stage_value(st.order, self.eam_stage),
                                         st.keys, st.fuse, st.generator, scores, st.scores_from_qk)
        st.stage_idx[self.eam_stage] = keep
        if st.record_scores:
            st.scores[self.eam_stage] = scores.detach()
        if st.track_positions:
            st.positions = next_positions(st.positions, keep, st.num_prefix, x.shape[1], st.fuse)
        return out


(PruneBlock, PruneEvaBlock, PruneBeitBlock, PruneCaitBlock,
 PruneConvitBlock) = block_classes("Prune", _PruneSteps, __name__)
