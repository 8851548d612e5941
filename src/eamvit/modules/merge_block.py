"""The merging blocks: each flat-token family's timm block that merges patch tokens (ToMe), installed by
class swap. See docs/architecture-modules.md."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from timm.models import cait

from eamvit.errors import EamError
from eamvit.modules.adapters import biasing, observing
from eamvit.modules.token_blocks import TokenBlock, block_classes
from eamvit.ops.merge import bipartite_plan, entropy_plan, merge_count, merge_tokens, size_bias
from eamvit.ops.positions import next_positions
from eamvit.ops.scores import attention_entropy, entropy_from_qk


@dataclass(eq=False)
class MergeState:
    """What all merging blocks of one model share (``model.eam_merge``); rebuilt from ``config`` alone.

    Args:
        r: tokens each merging block merges (before the cap of :func:`~eamvit.ops.merge.merge_count`).
        order: entropy order of ``"entropy"`` selection (1 = Shannon).
        prop_attn: add ``log size`` to the scores of every block after the first merge.
        later_attention: attention layers after the first merging block (their frozen maps are refused).
        track_positions: EVA02 and BEiT: keep ``positions`` for RoPE and the relative-position bias.

    After each forward: ``size`` ``(B, N_now)`` the token sizes (``None`` while nothing merged),
    ``positions`` each present token's index among the tokens entering the first merge (with
    ``track_positions``), ``kept[s]`` the input patch tokens that stayed at merging block ``s`` (as
    :class:`~eamvit.ops.merge.MergePlan` ``keep``; ``None`` where it merged nothing), ``tokens[s]``
    the tokens leaving it, and ``match_macs[s]`` ``(attention layer, tokens, MACs)`` of its matching
    product per image (the cost account reads them).
    """

    config: Any
    r: tuple[int, ...]
    selection: str
    order: float
    prop_attn: bool
    blocks: tuple[int, ...]
    num_prefix: int
    later_attention: list[nn.Module] = field(default_factory=list)
    track_positions: bool = False
    placement: str = "attn"  # ToMe merges between the attention and the MLP
    positions: Optional[torch.Tensor] = None
    size: Optional[torch.Tensor] = None
    kept: list[Optional[torch.Tensor]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    match_macs: list[tuple[int, int, int]] = field(default_factory=list)
    scores_from_qk: bool = False  # the export form: see TokenBlock._eam_reads_qk


class _MergeSteps(TokenBlock):
    """What every family's merging block shares: the per-forward trace, the key capture, the size bias, the merge."""

    eam_tokens: MergeState
    eam_verb = "token merging"

    def _eam_start(self, x: torch.Tensor, masked: bool) -> Optional[int]:
        """Tokens to merge here (0: only the size bias), or ``None`` when this block is timm's in this forward."""
        st = self.eam_tokens
        if self.eam_stage == 0:
            # The first merging block runs first in every forward: start a fresh trace.
            st.size = st.positions = None
            st.kept, st.tokens, st.match_macs = [None] * len(st.blocks), [x.shape[1]] * len(st.blocks), []
        r = 0
        if self.eam_stage is not None:
            st.tokens[self.eam_stage] = x.shape[1]
            r = merge_count(x.shape[1], st.num_prefix, st.r[self.eam_stage], st.selection)
        if not r and not (st.prop_attn and st.size is not None):
            return None
        if masked:
            raise EamError("token merging cannot apply a caller's attention mask (it is sized for all tokens); "
                           "run the merged model without one")
        if r and st.size is None and st.later_attention:
            self._check_frozen()
        return r

    def _eam_attend(self, r: int, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """``run()`` (the attention branch) with the size bias, and ``(keys, map, scores)`` when this block merges:
        the keys, and for entropy-guided merging the map, or in the export form the entropies from q and k."""
        st = self.eam_tokens
        bias = size_bias(st.size) if st.prop_attn and st.size is not None else None
        keys: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        qk: list[tuple[torch.Tensor, torch.Tensor]] = []
        from_qk = bool(r) and st.selection == "entropy" and self._eam_reads_qk()
        with contextlib.ExitStack() as stack:
            stack.enter_context(biasing([self.attn], {0: bias}))
            if from_qk:
                stack.enter_context(observing([self.attn], {0: lambda q, k: qk.append((q, k))}, "observer_qk"))
            elif r:
                stack.enter_context(observing([self.attn], {0: lambda k, mask: keys.append(k)}, "observer_k"))
                if st.selection == "entropy":
                    stack.enter_context(observing([self.attn], {0: lambda attn, mask: maps.append(attn)}))
            out = run()
        if from_qk:
            q, k = qk[0]
            with torch.no_grad():
                scores = entropy_from_qk(q, k, self.attn.scale, st.order, st.num_prefix, bias=bias)
            return out, (k, None, scores)
        return out, (keys[0] if keys else None, maps[0] if maps else None, None)

    def _eam_reduce(self, x: torch.Tensor, seen: Any, r: int) -> torch.Tensor:
        if not r:
            return x
        st = self.eam_tokens
        keys, attn, scores = seen
        P, (B, N, _) = st.num_prefix, x.shape
        features = keys.mean(1)  # ToMe's matching features: the keys averaged over heads, (B, N, d)
        d = features.shape[-1]
        if st.selection == "tome":
            plan = bipartite_plan(features, r, P)
            macs = ((N + 1) // 2) * (N // 2) * d
        else:
            if scores is None:
                with torch.no_grad():
                    scores = attention_entropy(attn, st.order, P)
            plan = entropy_plan(features, scores, r, P)
            macs = r * (N - P - r) * d
        x, st.size = merge_tokens(x, st.size, plan, P)
        if st.track_positions:
            st.positions = next_positions(st.positions, plan.keep, P, N, False)
        st.kept[self.eam_stage] = plan.keep
        st.tokens[self.eam_stage] = x.shape[1]
        st.match_macs.append((self.attn.eam.layer, N, macs))
        return x


(MergeBlock, MergeEvaBlock, MergeBeitBlock, MergeCaitBlock,
 MergeConvitBlock) = block_classes("Merge", _MergeSteps, __name__)


class MergeCaitClassBlock(cait.LayerScaleBlockClassAttn):
    """CaiT's class-attention block after merging blocks: the class token (size 1) attends with the size bias."""

    eam_timm_class = cait.LayerScaleBlockClassAttn
    eam_tokens: MergeState

    def forward(self, x: torch.Tensor, x_cls: torch.Tensor) -> torch.Tensor:
        st = self.eam_tokens
        if not (st.prop_attn and st.size is not None):
            return super().forward(x, x_cls)
        size = torch.cat([st.size.new_ones(st.size.shape[0], 1), st.size], dim=1)
        with biasing([self.attn], {0: size_bias(size)}):
            return super().forward(x, x_cls)
