"""Patch-token pruning by attention entropy (Shannon, Rényi), EViT or random: :func:`prune_` swaps the chosen
blocks for their family's pruning class (:mod:`eamvit.modules.prune_block`), :func:`unprune_` swaps them back."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import torch
from torch import nn

from eamvit.methods.state import peek, state_of
from eamvit.methods.steps import StepHandler, register_step
from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.methods.models import num_prefix_tokens, patch_grid
from eamvit.methods.reduce import (check_blocks, check_token_model, drop_frozen_after, eligible_blocks,
                                   has_class_token, order_label)
from eamvit.modules.adapters import TokenFamily
from eamvit.modules.attention import PRUNE_CLASSES, attention_layers, instrument, observe
from eamvit.modules.prune_block import PruneState
from eamvit.modules.token_blocks import restore_blocks_
from eamvit.ops.attention_stats import format_order
from eamvit.ops.scores import (KEYS, METHODS, attention_entropy, check_keep_rate, default_blocks, stage_value,
                               token_counts, trace_indices)

from eamvit.choices import PLACEMENTS, EntropyKeys, Placement, PruneMethod  # defined torch-free for the CLI
FrozenAfter = Literal["drop", "refuse"]


def _values(value: float | tuple[float, ...], name: str) -> tuple[float, ...]:
    """A per-block setting's values (one number or a non-empty tuple)."""
    if isinstance(value, tuple):
        if not value:
            raise EamError(f"{name} is an empty list; give one number, or one per pruning block")
        return value
    return (value,)


@dataclass(frozen=True)
class PruneConfig(Config):
    """How to prune (saved with fine-tuned models).

    Args:
        method: ``"shannon"``, ``"renyi"`` (order ``alpha``), ``"evit"`` or ``"random"``.
        keep_rate: κ in (0, 1]; each stage keeps ``ceil(κ·(N−1))`` patch tokens. One number for every
            pruning block, or one per pruning block (a tuple, in the blocks' order).
        alpha: Rényi order ≥ 0 (``math.inf`` = min-entropy; 1 = Shannon) of ``"renyi"``: one number, or
            one per pruning block.
        blocks: 0-based pruning blocks; ``None`` = EViT's (3, 6, 9) of 12 scaled to the depth.
        fuse: fuse the dropped tokens into one; ``None`` = on for EViT, off otherwise.
        placement: ``"attn"`` (after the attention residual, before the MLP; EViT) or ``"block"``
            (after the whole block).
        keys: ``"all"`` or ``"patches"``: which keys an entropy row is over.
        record_scores: keep each stage's scores on the model after a forward (figures, histograms).
        frozen_after: ``"drop"`` frozen EAM maps after the first pruning block, or ``"refuse"``.
    """

    KIND: ClassVar[str] = "prune"
    VERSION: ClassVar[int] = 1

    method: PruneMethod = "shannon"
    keep_rate: Union[float, tuple[float, ...]] = 0.7
    alpha: Union[float, tuple[float, ...]] = 2.0
    blocks: Optional[tuple[int, ...]] = None
    fuse: Optional[bool] = None
    placement: Placement = "attn"
    keys: EntropyKeys = "all"
    seed: int = 0
    record_scores: bool = False
    frozen_after: FrozenAfter = "drop"

    def _check(self) -> None:
        for k in _values(self.keep_rate, "keep_rate"):
            check_keep_rate(k)
        for a in _values(self.alpha, "alpha"):
            if not a >= 0:  # NaN too
                raise EamError(f"Rényi order alpha={a} must be ≥ 0 (e.g. 0.5, 2, 3 or inf)")
        if isinstance(self.alpha, tuple) and self.method != "renyi":
            raise EamError(f"one Rényi order per block applies to method 'renyi' only, not {self.method!r}; "
                           "give one alpha or use renyi")
        if self.blocks is not None:
            self.per_block(len(self.blocks), self.blocks)

    def per_block(self, stages: int, blocks: Sequence[int] = ()) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The keep rate and the entropy order of each of ``stages`` pruning blocks (``blocks``, for the
        message); order 1 for Shannon, and for EViT and random, which read none."""
        where = f" ({', '.join(map(str, blocks))})" if blocks else ""
        for name, value in (("keep_rate", self.keep_rate), ("alpha", self.alpha)):
            if isinstance(value, tuple) and len(value) != stages:
                raise EamError(f"{name} gives {len(value)} values for the {stages} pruning blocks{where}; give "
                               "one per pruning block or a single value")
        order = self.order
        return (tuple(float(stage_value(self.keep_rate, s)) for s in range(stages)),
                tuple(1.0 if order is None else stage_value(order, s) for s in range(stages)))

    @property
    def is_per_block(self) -> bool:
        """Whether the keep rate or the Rényi order differs per pruning block (a tuple)."""
        return isinstance(self.keep_rate, tuple) or isinstance(self.alpha, tuple)

    @property
    def fuse_tokens(self) -> bool:
        return self.method == "evit" if self.fuse is None else bool(self.fuse)

    @property
    def order(self) -> Optional[float | tuple[float, ...]]:
        """The entropy order used (1 for Shannon; per block for a per-block ``alpha``); ``None`` for EViT, random."""
        if self.method == "renyi":
            return tuple(map(float, self.alpha)) if isinstance(self.alpha, tuple) else float(self.alpha)
        return 1.0 if self.method == "shannon" else None

    @property
    def label(self) -> str:
        if self.method == "renyi":
            return f"Rényi α={'/'.join(order_label(a) for a in _values(self.alpha, 'alpha'))}"
        return {"shannon": "Shannon", "evit": "EViT", "random": "random"}[self.method]


@dataclass
class PruneReport:
    """What :func:`prune_` did: the pruning blocks, tokens per stage at the model's own image size
    (patch tokens, fused token included), and attention layers whose frozen EAM maps were removed."""

    config: dict[str, Any]
    blocks: list[int]
    tokens_per_stage: list[int]
    unfrozen_layers: list[int]


def _check_model(model: nn.Module, config: PruneConfig) -> tuple[nn.Module, TokenFamily]:
    """The model's blocks and their family, or one line saying why the model cannot prune."""
    blocks, fam = check_token_model(model, "token pruning", "prune", PRUNE_CLASSES)
    if fam.class_token and not has_class_token(model):
        raise EamError("token pruning needs a class token (EViT scores and the prediction read it); "
                       "this model has none or pools with attention")
    if not fam.class_token and (config.method == "evit" or config.fuse_tokens):
        raise EamError(f"EViT's score and token fusion read the class token's attention, and {fam.name}'s blocks run "
                       "before its class token exists; use shannon, renyi or random without fusion")
    return blocks, fam


def prune_(model: nn.Module, config: PruneConfig) -> PruneReport:
    """Make ``model`` (a flat-token ViT, EVA02, BEiT, CaiT or ConViT) prune patch tokens, in place; no weights
    change and :func:`unprune_` undoes it."""
    blocks_seq, fam = _check_model(model, config)
    if config.blocks is None:  # EViT's (3, 6, 9) of 12 scaled to the blocks that can prune
        eligible = eligible_blocks(blocks_seq, fam, "prune")
        blocks = tuple(eligible[i] for i in default_blocks(len(eligible)))
    else:
        blocks = check_blocks(config.blocks, blocks_seq, fam, "pruning", "prune")
    rates, _ = config.per_block(len(blocks), blocks)
    unprune_(model)
    layers = instrument(model)
    later, frozen_later = drop_frozen_after(layers, blocks[0], blocks_seq[blocks[0]].attn.eam.layer,
                                            min(rates) < 1, config.frozen_after, "pruning")
    state = PruneState(config=config, method=config.method, order=1.0 if config.order is None else config.order,
                       keys=config.keys, fuse=config.fuse_tokens, placement=config.placement, seed=config.seed,
                       record_scores=config.record_scores, blocks=blocks,
                       num_prefix=num_prefix_tokens(model) if fam.class_token else 0,
                       grid=patch_grid(model), keep_rate=rates if isinstance(config.keep_rate, tuple) else rates[0],
                       later_attention=later, track_positions=fam.positions)
    # Position-dependent families: every later block must see the present tokens' positions.
    followers = range(blocks[0] + 1, len(blocks_seq)) if fam.positions else ()
    for i in sorted(set(blocks) | set(followers)):
        blk = blocks_seq[i]
        blk.__class__ = fam.prune_class
        blk.eam_tokens = state
        blk.eam_stage = blocks.index(i) if i in blocks else None
    state_of(model).prune = state
    state_of(model).steps["prune"] = config
    n0 = state.grid[0] * state.grid[1] if state.grid else 0
    return PruneReport(config=config.to_dict(), blocks=list(blocks),
                       tokens_per_stage=token_counts(n0, config.keep_rate, len(blocks), config.fuse_tokens),
                       unfrozen_layers=frozen_later)


def unprune_(model: nn.Module) -> None:
    """Restore every pruning block to its timm class and forget the pruning state."""
    restore_blocks_(model, PRUNE_CLASSES, ("eam_tokens", "eam_stage"))
    st = peek(model)
    if st is not None:
        st.prune = None
        st.steps.pop("prune", None)


def prune_state(model: nn.Module) -> PruneState:
    st = state_of(model).prune
    if st is None:
        raise EamError("this model is not pruned; call prune_(model, PruneConfig(...)) first")
    return st


def set_keep_rate(model: nn.Module, keep_rate: float | Sequence[float]) -> None:
    """Change κ of a pruned model (e.g. the fine-tuning schedule): one for every pruning block, or one per
    pruning block; κ = 1 runs the unpruned model."""
    st = prune_state(model)
    if isinstance(keep_rate, (tuple, list)):
        if len(keep_rate) != len(st.blocks):
            raise EamError(f"{len(keep_rate)} keep rates for the {len(st.blocks)} pruning blocks; give one per block")
        st.keep_rate = tuple(check_keep_rate(k) for k in keep_rate)
    else:
        st.keep_rate = check_keep_rate(keep_rate)


def kept_indices(model: nn.Module) -> list[torch.Tensor]:
    """After a forward: per stage, ``(B, n_s)`` indices into the original patch grid (row-major) of
    the patch tokens leaving that stage, in token order; ``-1`` marks the fused token."""
    st = prune_state(model)
    if not st.stage_idx:
        raise EamError("run a forward pass of the pruned model before asking for kept indices")
    return trace_indices(st.stage_idx, st.num_patches, st.fuse, st.batch, st.device)


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


@torch.no_grad()
def token_entropies(model: nn.Module, images: torch.Tensor, alphas: Sequence[float] = (1.0, 2.0),
                    layers: Optional[Sequence[int]] = None, keys: str = "all") -> dict[float, list[torch.Tensor]]:
    """``{alpha: [per layer of ``layers`` (all by default), (B·n_l,)]}``: the per-token attention entropies
    (averaged over heads) of every patch token, from one forward of ``images`` (the seed's Fig. 5 data). The
    observers chain with a pruned model's own capture, so a pruned model shows the tokens each block really saw."""
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


@torch.no_grad()
def kept_patch_masks(model: nn.Module, image: torch.Tensor, configs: Sequence[PruneConfig]) -> dict[str, list[torch.Tensor]]:
    """``{config.label: [per stage, (gh, gw) booleans on the CPU]}``: the patches of one image ``(C, H, W)``
    still present after each pruning stage (Fig. 4's data); the model is left unpruned."""
    if image.dim() != 3:
        raise EamError(f"give one image (C, H, W), not a tensor of shape {tuple(image.shape)}")
    out: dict[str, list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    try:
        for c in configs:
            prune_(model, c)
            model(image.unsqueeze(0).to(next(model.parameters()).device))
            out[c.label] = [m[0].cpu() for m in kept_masks(model)]
    finally:
        unprune_(model)
        model.train(was_training)
    return out


def setting_text(value: float | Sequence[float]) -> float | str:
    """A keep rate or Rényi order as a results row and a command line write it: the number (``"inf"`` for
    infinity, JSON has none), or one per pruning block comma-joined (``"0.9,0.7,0.5"``, ``"2,inf,2"``,
    what ``--keep-rate`` and ``--alpha`` read back)."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(format_order, value))
    return "inf" if math.isinf(value) else value


def method_config(method: str, alpha: Optional[float], keep_rate: float, **options: Any) -> PruneConfig:
    """A :class:`PruneConfig` for one (method, α) of a sweep."""
    return PruneConfig(method=method, keep_rate=keep_rate, **options, **({"alpha": alpha} if alpha is not None else {}))


def parse_methods(text: str) -> list[tuple[str, Optional[float]]]:
    """``"shannon,renyi:0.5,renyi:2,renyi:inf,evit,random"`` → ``[(method, alpha), ...]``."""
    out: list[tuple[str, Optional[float]]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
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


register_step(PruneConfig, StepHandler(stage="prune", order=30, apply=lambda model, config, inputs: prune_(model, config),
                                       restore=lambda model, config, meta, tensors, path: prune_(model, config)))
