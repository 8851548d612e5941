"""What token pruning and token merging share: which models and blocks can change their token set, and
what becomes of frozen EAM maps after the first block that does."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from torch import nn

from eamvit.errors import EamError
from eamvit.methods.models import num_prefix_tokens
from eamvit.modules.adapters import TokenFamily
from eamvit.modules.attention import TOKEN_FAMILIES, instrument, require
from eamvit.modules.token_blocks import timm_block_class

# What each verb is called in messages, and how it is undone.
_UNDO = {"token pruning": "unprune_", "token merging": "unmerge_"}


def check_token_model(model: nn.Module, verb: str, adapter_verb: str,
                      own: dict[type, type]) -> tuple[nn.Module, TokenFamily]:
    """The model's blocks and their family, or one line saying why ``verb`` cannot apply to the model.

    Args:
        verb: ``"token pruning"`` or ``"token merging"`` (messages).
        adapter_verb: the attention adapters' verb (``"prune"``, ``"merge"``).
        own: the verb's swapped classes (swapped class → timm class): blocks it swapped before are fine.
    """
    require(instrument(model), adapter_verb)  # the adapters' reasons (Swin, hierarchical families, XCiT)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks):
        raise EamError(f"{verb} needs a flat-token model with .blocks (ViT/DeiT, EVA02, BEiT, CaiT, ConViT); "
                       f"{type(model).__name__} has none")
    other = next((b for b in blocks if getattr(type(b), "eam_timm_class", None) and type(b) not in own), None)
    if other is not None:
        done = other.eam_verb
        raise EamError(f"this model already has {done} applied; {verb} does not stack with it "
                       f"(undo it first with {_UNDO.get(done, 'its undo')}(model))")
    kinds = {timm_block_class(b) for b in blocks}
    bad = sorted(k.__name__ for k in kinds if k not in TOKEN_FAMILIES)
    if bad or len(kinds) != 1:
        names = ", ".join(f"{f.name} {c.__module__.rsplit('.', 1)[-1]}.{c.__name__}" for c, f in TOKEN_FAMILIES.items())
        raise EamError(f"{verb} supports models whose blocks are all one of: {names}; this model has "
                       f"{', '.join(bad or sorted(k.__name__ for k in kinds))}")
    fam = TOKEN_FAMILIES[kinds.pop()]
    reason = fam.refuse_model(model)
    if reason:
        raise EamError(f"{verb} does not apply to this {fam.name} model: {reason}")
    return blocks, fam


def has_class_token(model: nn.Module) -> bool:
    """Whether the prediction reads a class token (not attention pooling, not a model without one)."""
    return num_prefix_tokens(model) >= 1 and getattr(model, "global_pool", "token") != "map"


def check_blocks(blocks: Sequence[int], blocks_seq: nn.Module, fam: TokenFamily, what: str,
                 act: str) -> tuple[int, ...]:
    """``blocks`` sorted, or one line naming a block outside the model, repeated, or one that cannot take part
    (``what``: ``"pruning"``/``"merging"``, ``act``: ``"prune"``/``"merge"``, for messages)."""
    depth = len(blocks_seq)
    blocks = tuple(blocks)
    if not blocks:
        raise EamError(f"no {what} blocks given; name at least one 0-based block")
    for b in blocks:
        if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < depth:
            raise EamError(f"{what} block {b} is outside the model's {depth} blocks (0-based 0..{depth - 1})")
        reason = fam.refuse(blocks_seq[b])
        if reason:
            raise EamError(f"block {b} of this {fam.name} model cannot {act}: {reason}")
    if len(set(blocks)) != len(blocks):
        raise EamError(f"{what} blocks {list(blocks)} repeat a block")
    return tuple(sorted(blocks))


def eligible_blocks(blocks_seq: nn.Module, fam: TokenFamily, act: str) -> list[int]:
    """The blocks of this model that can take part, or one line when none can."""
    eligible = [i for i, b in enumerate(blocks_seq) if fam.refuse(b) is None]
    if not eligible:
        raise EamError(f"no block of this {fam.name} model can {act}: {fam.refuse(blocks_seq[0])}")
    return eligible


def drop_frozen_after(layers: list[nn.Module], first_block: int, first_layer: int, reduces: bool,
                      frozen_after: str, verb: str) -> tuple[list, list[int]]:
    """Attention layers after the first reducing block (``first_layer``: its attention layer), and those
    whose frozen maps were removed (``frozen_after="drop"``; ``"refuse"`` refuses them). A configuration that
    changes no token (``reduces`` false) leaves every frozen map in place."""
    later = [m for m in layers if m.eam.layer > first_layer]
    frozen_later = [m.eam.layer for m in later if m.eam_frozen_mask is not None] if reduces else []
    if frozen_later and frozen_after == "refuse":
        raise EamError(f"attention layers {frozen_later} have frozen EAM maps after the first {verb} block "
                       f"{first_block}; frozen maps cannot follow {verb} (unfreeze them, or use frozen_after='drop')")
    for m in later:
        if m.eam.layer in frozen_later:
            m.eam_frozen_mask = m.eam_frozen_values = None
    return later, frozen_later


def order_label(alpha: Any) -> str:
    """A Rényi order as labels show it: ``2``, ``0.5``, ``∞`` (from a number or a results row's ``"inf"``)."""
    return "∞" if alpha in ("inf", math.inf) else f"{float(alpha):g}"


def row_label(row: Mapping[str, Any]) -> str:
    """Display name of a token-reduction result row's method: pruning rows name their score (``Shannon``,
    ``Rényi α=2``, ``EViT``, ``random``), merging rows their selection (``ToMe``, ``entropy merging (Rényi
    α=2)``), a row with neither ``unmodified``."""
    merge = row.get("merge")
    if merge:
        if merge == "tome":
            return "ToMe"
        alpha = row.get("alpha")
        return "entropy merging" + ("" if alpha in (None, "") else f" (Rényi α={order_label(alpha)})")
    m = row.get("prune") or "none"
    if m == "renyi":
        return f"Rényi α={order_label(row['alpha'])}"
    return {"shannon": "Shannon", "evit": "EViT", "random": "random", "none": "unmodified"}.get(m, m)
