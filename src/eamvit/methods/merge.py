"""Token merging, ToMe's and entropy-guided: :func:`merge_` swaps the blocks from the first merging block on
for their family's merging class (:mod:`eamvit.modules.merge_block`), :func:`unmerge_` swaps them back."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Optional, Union

from torch import nn

from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.methods.cost import count_gflops
from eamvit.methods.models import num_prefix_tokens, patch_grid
from eamvit.methods.reduce import check_blocks, check_token_model, drop_frozen_after, eligible_blocks, order_label
from eamvit.methods.state import peek, state_of, step_config
from eamvit.methods.steps import StepHandler, register_step
from eamvit.modules.attention import MERGE_CLASSES, instrument
from eamvit.modules.merge_block import MergeState
from eamvit.modules.token_blocks import restore_blocks_
from eamvit.ops.merge import SELECTIONS, merge_schedule, token_counts

FROZEN_AFTER = ("drop", "refuse")


@dataclass(frozen=True)
class MergeConfig(Config):
    """How to merge tokens (saved with compressed and exported models).

    Args:
        r: patch tokens each merging block merges: one number (shaped by ``inflect``) or one per merging
            block (ToMe's list form).
        inflect: ToMe's schedule for one number ``r``, in [-1, 1]: 0 constant, -1 decreasing (``2r``
            down to 0), +1 increasing; the mean stays ``r`` (before truncation).
        blocks: the merging blocks (0-based); ``None`` = every block that can merge (ToMe).
        prop_attn: proportional attention (``log size`` added to the scores), ToMe's default off the shelf.
        selection: ``"tome"`` (bipartite soft matching) or ``"entropy"`` (entropy-guided merging).
        alpha: entropy order of ``"entropy"`` (Rényi; ``math.inf`` = min-entropy); ``None`` = Shannon.
        frozen_after: ``"drop"`` frozen EAM maps after the first merging block, or ``"refuse"``.
    """

    KIND: ClassVar[str] = "merge"
    VERSION: ClassVar[int] = 1

    r: Union[int, tuple[int, ...]] = 8
    inflect: float = 0.0
    blocks: Optional[tuple[int, ...]] = None
    prop_attn: bool = True
    selection: str = "tome"
    alpha: Optional[float] = None
    frozen_after: str = "drop"

    def _check(self) -> None:
        if self.r == ():
            raise EamError("r lists no tokens per block; give a number or one per merging block")
        negative = next((v for v in (self.r if isinstance(self.r, tuple) else (self.r,)) if v < 0), None)
        if negative is not None:  # the type is the Config base's check
            what = "tokens to merge" if isinstance(self.r, tuple) else "r"
            raise EamError(f"{what} {negative!r} must be a whole number ≥ 0 (tokens merged per block)")
        if not -1.0 <= self.inflect <= 1.0:
            raise EamError(f"inflect {self.inflect!r} is outside [-1, 1] (0 constant, -1 ToMe's decreasing schedule)")
        if self.inflect and isinstance(self.r, tuple):
            raise EamError("inflect shapes one number r; with one r per block, leave inflect at 0")
        if self.selection not in SELECTIONS:
            raise EamError(f"merging selection {self.selection!r} is not one of {', '.join(SELECTIONS)}")
        if self.alpha is not None and self.selection != "entropy":
            raise EamError("alpha (the entropy order) applies to selection='entropy' only; drop it for ToMe")
        if self.alpha is not None and not self.alpha >= 0:  # NaN too
            raise EamError(f"Rényi order alpha={self.alpha} must be ≥ 0 (e.g. 0.5, 2, 3 or inf)")
        if self.frozen_after not in FROZEN_AFTER:
            raise EamError(f"frozen_after {self.frozen_after!r} is not one of {', '.join(FROZEN_AFTER)}")

    @property
    def order(self) -> float:
        """The entropy order of entropy-guided merging (1 = Shannon)."""
        return 1.0 if self.alpha is None else float(self.alpha)

    def schedule(self, steps: int) -> list[int]:
        """Tokens to merge at each of ``steps`` merging blocks (before the per-block cap)."""
        if isinstance(self.r, tuple):
            if len(self.r) != steps:
                raise EamError(f"r gives {len(self.r)} values for {steps} merging blocks; give one per block")
            return list(self.r)
        return merge_schedule(self.r, float(self.inflect), steps)

    @property
    def label(self) -> str:
        r = "r=" + ("/".join(map(str, self.r)) if isinstance(self.r, tuple) else f"{self.r}")
        if self.inflect:
            r += f" inflect {self.inflect:g}"
        if self.selection == "tome":
            return f"ToMe {r}"
        name = "Shannon" if self.alpha is None else f"Rényi α={order_label(self.alpha)}"
        return f"entropy merging ({name}) {r}"


@dataclass
class MergeReport:
    """What :func:`merge_` did at the model's own image size: the merging blocks, ``r`` (tokens each merges: the
    schedule, each capped at what the block can merge), ``tokens`` (prefix included, entering the first merging
    block, then leaving each) and the attention layers whose frozen EAM maps were removed."""

    config: dict[str, Any]
    blocks: list[int]
    r: list[int]
    tokens: list[int]
    unfrozen_layers: list[int]


def merge_(model: nn.Module, config: MergeConfig) -> MergeReport:
    """Make ``model`` (a flat-token ViT, EVA02, BEiT, CaiT or ConViT) merge tokens, in place; no weights
    change and :func:`unmerge_` undoes it. A refused model is left as it was."""
    blocks_seq, fam = check_token_model(model, "token merging", "merge", MERGE_CLASSES)
    blocks = (tuple(eligible_blocks(blocks_seq, fam, "merge")) if config.blocks is None
              else check_blocks(config.blocks, blocks_seq, fam, "merging", "merge"))
    later_blocks = range(blocks[0], len(blocks_seq))
    bad = next((i for i in later_blocks if fam.refuse(blocks_seq[i])), None)
    if bad is not None:  # every later block carries the sizes (and positions)
        raise EamError(f"block {bad} of this {fam.name} model comes after the first merging block {blocks[0]} but "
                       f"cannot take merged tokens: {fam.refuse(blocks_seq[bad])}")
    if config.prop_attn and getattr(model, "global_pool", None) == "map":
        raise EamError("this model pools its tokens with attention, which would read merged tokens without their "
                       "sizes; merge with prop_attn=False or use a model with a class token")
    rs = config.schedule(len(blocks))
    num_prefix = num_prefix_tokens(model) if fam.class_token else 0
    layers = instrument(model)
    later, frozen_later = drop_frozen_after(layers, blocks[0], blocks_seq[blocks[0]].attn.eam.layer, any(rs),
                                            config.frozen_after, "merging")
    unmerge_(model)
    state = MergeState(config=config, r=tuple(rs), selection=config.selection, order=config.order,
                       prop_attn=config.prop_attn, blocks=blocks, num_prefix=num_prefix, later_attention=later,
                       track_positions=fam.positions)
    for i in later_blocks:
        blk = blocks_seq[i]
        blk.__class__ = fam.merge_class
        blk.eam_tokens = state
        blk.eam_stage = blocks.index(i) if i in blocks else None
    for blk in getattr(model, "blocks_token_only", None) or ():  # CaiT's class attention reads the sizes
        if type(blk) in fam.merge_followers:
            blk.__class__ = fam.merge_followers[type(blk)]
            blk.eam_tokens = state
    state_of(model).merge = state
    state_of(model).steps["merge"] = config
    grid = patch_grid(model)
    tokens = token_counts((grid[0] * grid[1] if grid else 0) + num_prefix, num_prefix, rs, config.selection)
    return MergeReport(config=config.to_dict(), blocks=list(blocks), r=[a - b for a, b in zip(tokens, tokens[1:])],
                       tokens=tokens, unfrozen_layers=frozen_later)


def unmerge_(model: nn.Module) -> None:
    """Restore every merging block to its timm class and forget the merging state."""
    restore_blocks_(model, MERGE_CLASSES, ("eam_tokens", "eam_stage"))
    st = peek(model)
    if st is not None:
        st.merge = None
        st.steps.pop("merge", None)


def merge_state(model: nn.Module) -> MergeState:
    """The model's :class:`~eamvit.modules.merge_block.MergeState`, or one line saying it does not merge."""
    st = state_of(model).merge
    if st is None:
        raise EamError("this model does not merge tokens; call merge_(model, MergeConfig(...)) first")
    return st


def r_for_gmacs(model: nn.Module, gmacs: float, config: MergeConfig = MergeConfig()) -> tuple[MergeConfig, float]:
    """``(config with r, its GMACs)``: the one number ``r`` whose executed GMACs (the cost account's, matching
    included) come closest to ``gmacs`` per image (ties: the smaller ``r``), e.g. to compare merging with pruning
    at equal work. ``model`` is unmerged and unpruned, and left unmerged.

    Tokens never grow with ``r`` (each block merges ``min(r, cap)`` of what it is given), so neither do the
    MACs, and ``r`` is found by bisection over ``0 ..`` the patch tokens.
    """
    if isinstance(config.r, tuple):
        raise EamError("matching GMACs chooses one number r; give a config with r a number, not one per block")
    cache: dict[int, float] = {}

    def cost(r: int) -> float:
        if r not in cache:
            merge_(model, replace(config, r=r))
            try:
                cache[r] = count_gflops(model)
            finally:
                unmerge_(model)
        return cache[r]

    grid = patch_grid(model)
    top = max(1, grid[0] * grid[1] if grid else 256)  # past the patch tokens nothing more merges

    def smallest(at_most: float) -> int:  # the smallest r whose MACs are at most that (top when none is)
        lo, hi = 0, top
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cost(mid) <= at_most else (mid + 1, hi)
        return lo

    r = smallest(gmacs)
    if r > 0 and abs(cost(r - 1) - gmacs) <= abs(cost(r) - gmacs):
        r -= 1
    r = smallest(cost(r))  # a larger r that merges no more tokens is not the answer
    return replace(config, r=r), cost(r)


# OpenVINO's CPU plugin runs a per-channel quantization only inside the layer that makes the value: when
# merging also reads the float keys, the qkv output's per-channel QuantizeLinear stands alone and the
# graph does not compile.
OPENVINO_REPQ_MERGE = ("OpenVINO cannot run RepQ-ViT's int8 attention together with token merging (its per-channel "
                       "quantization of q, k and v cannot stand beside the keys merging reads); for OpenVINO quantize "
                       "with NNCF (optimize --runtime openvino), or use --target qdq for ONNX Runtime")


def _export_step(model: nn.Module, config: MergeConfig, export: Any) -> None:
    if export.runtime == "openvino" and export.scheme == "qdq" and step_config(model, "quant") is not None:
        raise EamError(OPENVINO_REPQ_MERGE)
    # Before opset 16 ScatterElements has no reduction: merged tokens landing on one destination would overwrite.
    if export.opset is not None and export.opset < 16:
        raise EamError(f"ONNX export of token merging needs opset 16 (ScatterElements with reduction='add'), "
                       f"not {export.opset}; export with --opset 16 or more, or leave --opset out")


register_step(MergeConfig, StepHandler(stage="merge", order=35, apply=lambda model, config, inputs: merge_(model, config),
                                       restore=lambda model, config, meta, tensors, path: merge_(model, config),
                                       export=_export_step))
