"""Blocks that change the token set between their attention and their MLP: one mixin per flat-token
family, combined with a verb's steps. See docs/architecture-modules.md."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from timm.models import beit, cait, convit, eva
from timm.models.vision_transformer import Block

from eamvit.errors import EamError
from eamvit.ops.positions import gather_pair_bias, gather_rope


class TokenBlock:
    """The shared driver of a reducing block. ``eam_tokens`` is the verb's state; ``eam_stage`` the block's index
    among the reducing blocks, ``None`` for a follower (a later block that only needs what the reduction left:
    positions, token sizes); ``eam_timm_class`` the class swapped back in when the verb is undone. The verb's
    steps class defines ``_eam_start(x, masked) -> plan`` (``None``: timm's forward), ``_eam_attend(plan, run)
    -> (attention branch, what the step saw)`` and ``_eam_reduce(x, seen, plan) -> tokens``."""

    eam_tokens: Any
    eam_stage: Optional[int]
    eam_timm_class: type
    eam_verb: str = "token reduction"

    def _check_frozen(self) -> None:
        """Refuse frozen EAM maps after the first reducing block (they describe the full token set)."""
        for module in self.eam_tokens.later_attention:
            if module.eam_frozen_mask is not None:
                first = self.eam_tokens.blocks[0]
                raise EamError(f"attention layer {module.eam.layer} has frozen EAM maps but comes after "
                               f"{self.eam_verb} at block {first}; freeze before {self.eam_verb} (it drops maps "
                               "that no longer apply) or unfreeze those layers")

    def _eam_reads_qk(self) -> bool:
        """The export form (docs/architecture-modules.md) where the attention is a float ViT attention: it keeps
        its fused kernel, and what the step reads of the map is recomputed from ``eam.observer_qk``."""
        a = self.attn
        return (self.eam_tokens.scores_from_qk and getattr(a, "eam_reads_qk", False) and a.eam_quant is None
                and a.eam_frozen_mask is None and a.eam.observer is None and a.eam.observer_q is None)

    def _eam_run(self, x: torch.Tensor, plan: Any, attn_branch: Callable[[torch.Tensor], torch.Tensor],
                 mlp_branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``x + attn_branch(x)``, then reduce before (``"attn"``) or after (``"block"``) ``x + mlp_branch(x)``."""
        y, seen = self._eam_attend(plan, lambda: attn_branch(x))
        x = x + y
        if self.eam_tokens.placement == "attn":
            x = self._eam_reduce(x, seen, plan)
            return x + mlp_branch(x)
        x = x + mlp_branch(x)
        return self._eam_reduce(x, seen, plan)

    def _eam_run_scaled(self, x: torch.Tensor, plan: Any, **attn_kwargs: Any) -> torch.Tensor:
        """:meth:`_eam_run` of EVA02's and BEiT's blocks: each branch scaled by ``gamma_1``/``gamma_2`` where set."""
        scaled = lambda g, y: y if g is None else g * y  # noqa: E731
        return self._eam_run(
            x, plan, lambda t: self.drop_path1(scaled(self.gamma_1, self.attn(self.norm1(t), **attn_kwargs))),
            lambda t: self.drop_path2(scaled(self.gamma_2, self.mlp(self.norm2(t)))))


class VitTokens(TokenBlock):
    """timm ``Block`` (ViT family)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        plan = self._eam_start(x, attn_mask is not None)
        if plan is None or attn_mask is not None:
            # Nothing to do (or a caller-given mask sized for all tokens): timm's own, fused forward.
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self._eam_run(x, plan, lambda t: self.drop_path1(self.ls1(self.attn(self.norm1(t), attn_mask=None,
                                                                                     is_causal=is_causal))),
                             lambda t: self.drop_path2(self.ls2(self.mlp(self.norm2(t)))))


class EvaTokens(TokenBlock):
    """EVA02's ``EvaBlock``; after the first reducing block it rotates q and k by the present tokens' RoPE."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        plan = self._eam_start(x, attn_mask is not None)
        st = self.eam_tokens
        if rope is not None and st.positions is not None:
            rope = gather_rope(rope, st.positions, st.num_prefix)
        if plan is None or attn_mask is not None:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        return self._eam_run_scaled(x, plan, rope=rope, attn_mask=None, is_causal=is_causal)


class BeitTokens(TokenBlock):
    """BEiT's ``Block``; after the first reducing block its relative-position biases cover the present tokens."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        plan = self._eam_start(x, False)
        positions = self.eam_tokens.positions
        if positions is not None and shared_rel_pos_bias is not None:
            shared_rel_pos_bias = gather_pair_bias(shared_rel_pos_bias, positions)
        self.attn.eam.positions = positions
        try:
            if plan is None:
                return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
            return self._eam_run_scaled(x, plan, shared_rel_pos_bias=shared_rel_pos_bias)
        finally:
            self.attn.eam.positions = None


class CaitTokens(TokenBlock):
    """CaiT's self-attention ``LayerScaleBlock`` (before the class token exists)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._eam_start(x, False)
        if plan is None:
            return super().forward(x)
        return self._eam_run(x, plan, lambda t: self.drop_path(self.gamma_1 * self.attn(self.norm1(t))),
                             lambda t: self.drop_path(self.gamma_2 * self.mlp(self.norm2(t))))


class ConvitTokens(TokenBlock):
    """ConViT's ``Block`` with plain multi-head self-attention (after the GPSA blocks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._eam_start(x, False)
        if plan is None:
            return super().forward(x)
        return self._eam_run(x, plan, lambda t: self.drop_path(self.attn(self.norm1(t))),
                             lambda t: self.drop_path(self.mlp(self.norm2(t))))


# Each flat-token family's mixin and timm block class, in the order :func:`block_classes` returns them.
_FAMILY_BLOCKS = (("", VitTokens, Block), ("Eva", EvaTokens, eva.EvaBlock), ("Beit", BeitTokens, beit.Block),
                  ("Cait", CaitTokens, cait.LayerScaleBlock), ("Convit", ConvitTokens, convit.Block))


def block_classes(verb: str, steps: type, module: str) -> tuple[type, ...]:
    """A verb's block class per flat-token family, ``<verb><Family>Block(family mixin, steps, timm class)``,
    defined in ``module`` (the caller's ``__name__``, where pickling looks it up)."""
    return tuple(type(f"{verb}{name}Block", (mixin, steps, timm_class),
                      {"eam_timm_class": timm_class, "__module__": module})
                 for name, mixin, timm_class in _FAMILY_BLOCKS)


def timm_block_class(block: nn.Module) -> type:
    """The timm class of ``block``, also while a verb has swapped it."""
    return getattr(type(block), "eam_timm_class", type(block))


def restore_blocks_(model: nn.Module, classes: dict[type, type], attrs: tuple[str, ...]) -> None:
    """Swap every block of a verb's ``classes`` (swapped class → timm class) back and forget ``attrs``."""
    for m in model.modules():
        if type(m) in classes:
            m.__class__ = classes[type(m)]
            for attr in attrs:
                m.__dict__.pop(attr, None)
