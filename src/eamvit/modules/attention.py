"""The one attention instrumentation of eamvit: swap, observe, bias and freeze attention by adapter.
See docs/architecture-modules.md for the state it sets on each module and why."""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Literal, Mapping, Optional

import torch
from torch import nn

from eamvit.errors import EamError
from eamvit.modules import families, vit_swin
from eamvit.modules.adapters import (PLAN_BUFFERS, VERB_TITLES, VERBS, Adapter, Observer, TokenFamily, biasing,
                                     observing, require)
from eamvit.modules.vit_swin import EamAttention, EamWindowAttention

__all__ = ["ADAPTERS", "EamAttention", "EamWindowAttention", "attention_layers", "bias_scores", "executes_plans",
           "input_size", "instrument", "layer_shapes", "min_opset", "models_table", "observe", "require", "set_frozen"]

Stage = Literal["softmax", "quantized", "keys"]
_STAGE_ATTR = {"softmax": "observer", "quantized": "observer_q", "keys": "observer_k"}

ADAPTERS: tuple[Adapter, ...] = vit_swin.ADAPTERS + families.ADAPTERS
# Exact-type registry: a subclass of a timm attention with its own forward is not assumed compatible.
_BY_CLASS: dict[type, Adapter] = {a.timm_class: a for a in ADAPTERS}
_INSTRUMENTED = frozenset(a.eam_class for a in ADAPTERS)
FAMILIES = vit_swin.FAMILIES + families.FAMILIES
# How each timm block class drops or merges tokens (the adapters' `tokens`), and each class a verb swaps in
# → its timm class (merging: CaiT's class-attention blocks too).
TOKEN_FAMILIES: dict[type, TokenFamily] = {a.tokens.block: a.tokens for a in ADAPTERS if a.tokens is not None}
PRUNE_CLASSES: dict[type, type] = {f.prune_class: f.block for f in TOKEN_FAMILIES.values()}
MERGE_CLASSES: dict[type, type] = {m: t for f in TOKEN_FAMILIES.values()
                                   for t, m in ((f.block, f.merge_class), *f.merge_followers.items())}
SUPPORTED_FAMILIES = ", ".join(f.name for f in FAMILIES)
# Class names that say "attention": an unknown one is refused rather than left unmapped in silence.
_ATTENTION_NAME = re.compile(r"(Attention|Attn)(2d)?$|^(XCA|GPSA|MHSA)$")


def _instrumented(cls: type) -> bool:
    """An instrumented class, or eamvit's own subclass of one (an export class that changes the graph's form)."""
    return cls in _INSTRUMENTED or any(issubclass(cls, c) for c in _INSTRUMENTED)


def _unknown_attention(module: nn.Module) -> bool:
    cls = type(module)
    return (cls not in _BY_CLASS and not _instrumented(cls) and cls not in families.UNMAPPED
            and cls is not nn.MultiheadAttention and "Block" not in cls.__name__
            and bool(_ATTENTION_NAME.search(cls.__name__)))


def _refuse(what: str) -> EamError:
    return EamError(f"{what}: eamvit supports {SUPPORTED_FAMILIES}; `eamvit models` lists them")


def models_table() -> str:
    """The families × verbs table of the registry (markdown), as ``eamvit models`` prints it: a family supports
    a verb when all its classes do."""
    lines = ["| family | attention classes | " + " | ".join(VERB_TITLES[v] for v in VERBS) + " | example | note |",
             "|" + "---|" * (len(VERBS) + 4)]
    for fam in FAMILIES:
        cells = ["yes" if all(v in _BY_CLASS[c].verbs for c in fam.classes) else "no" for v in VERBS]
        names = ", ".join(f"{c.__module__.rsplit('.', 1)[-1]}.{c.__name__}" for c in fam.classes)
        lines.append(f"| {fam.name} | {names} | " + " | ".join(cells) + f" | {fam.example} | {fam.note} |")
    return "\n".join(lines)


def _adapters(model: nn.Module) -> list[Adapter]:
    """The adapters of ``model``'s attention modules, instrumented or not, in module order, each once."""
    out: list[Adapter] = []
    for module in model.modules():
        cls = type(module)
        adapter = _BY_CLASS.get(cls) or next((a for a in ADAPTERS if issubclass(cls, a.eam_class)), None)
        if adapter is not None and adapter not in out:
            out.append(adapter)
    return out


def input_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """The image size ``(H, W)`` the built ``model`` takes (its adapters read it); None: any size, or unregistered."""
    sizes = (adapter.input_size(model) for adapter in _adapters(model))
    return next((size for size in sizes if size is not None), None)


def min_opset(model: nn.Module, size: tuple[int, int]) -> tuple[int, str]:
    """The lowest ONNX opset (and why) an export of ``model`` at images of ``size`` needs; ``(0, "")``: any."""
    return max((a.min_opset(model, size) for a in _adapters(model)), key=lambda need: need[0], default=(0, ""))


def instrument(model: nn.Module) -> list[nn.Module]:
    """Swap every supported attention module of ``model`` for its instrumented class, in place (idempotent).

    Returns the instrumented attention modules, index = layer number (module order: block order for ViT, stage
    then block for Swin). Refuses a model with no supported attention, or one with an unregistered attention class.
    """
    unknown = next((m for m in model.modules() if _unknown_attention(m)), None)
    if unknown is not None:
        cls = type(unknown)
        raise _refuse(f"unsupported attention {cls.__module__}.{cls.__name__} in {type(model).__name__}")
    layers: list[nn.Module] = []
    for module in model.modules():
        cls = type(module)
        if _instrumented(cls):
            layers.append(module)
        elif cls in _BY_CLASS:
            adapter = _BY_CLASS[cls]
            module.__class__ = adapter.eam_class
            module._eam_init(len(layers), adapter)
            layers.append(module)
    if not layers:
        raise _refuse(f"unsupported model {type(model).__name__}")
    for adapter in _adapters(model):  # groups per image (Swin's windows, TNT's patches), for the map's shape
        adapter.bind(model)
    return layers


def _frozen_units(module: nn.Module, m4: torch.Tensor, plan: str) -> torch.Tensor:
    """Which heads ``(H,)`` or query rows ``(N,)`` a ``(G, H, N, N)`` mask freezes whole; refuses any other mask."""
    units = m4.flatten(2).all(-1).all(0) if plan == "head" else m4[0].all(-1).all(0)
    covered = units.view((1, -1, 1, 1) if plan == "head" else (1, 1, -1, 1)).expand_as(m4)
    if not torch.equal(covered, m4):
        raise EamError(f"layer {module.eam.layer}: the frozen mask does not cover whole {plan}s; "
                       f"freeze with granularity {plan!r}")
    return units


def executes_plans(module: nn.Module, plan: str = "head") -> bool:
    """Whether ``module`` can execute a frozen ``plan`` (:meth:`Adapter.executes`); others simulate it."""
    return module.eam.adapter.executes(plan)


def set_frozen(module: nn.Module, mask: Optional[torch.Tensor], values: Optional[torch.Tensor],
               plan: Optional[str] = None, execute: bool = True) -> None:
    """Freeze entries of one instrumented attention layer (``mask=None`` unfreezes it).

    Args:
        mask: bool, the layer's attention shape ``(H, N, N)`` or ``(nW, H, N, N)``: entries to freeze.
        plan: ``None`` (entries, simulated: the whole map computed, then its frozen entries overwritten with
            the numbers of ``torch.where``), ``"head"`` (the mask must cover whole heads, every window) or
            ``"row"`` (whole query rows of every head; maps with one set of rows).
        execute: skip the work of a ``plan``'s frozen units; ``False`` simulates them (recorded in
            ``eam.granularity`` so that a cost account can say what executing would save). A module that
            cannot execute plans (:func:`executes_plans`) needs ``False`` for heads and simulates rows.

    Raises:
        EamError: a plan the mask does not match, or one the layer's adapter does not support.
    """
    if mask is not None:
        if plan not in (None, "head", "row"):
            raise EamError(f"frozen-attention plan {plan!r} is not one of head, row")
        require([module], "entry" if plan is None else plan)
        if plan == "head" and execute:
            require([module], "executed_head")
    for name in PLAN_BUFFERS:
        setattr(module, name, None)
    module.eam.cache.clear()
    module.eam.plan = None
    module.eam.granularity = plan if mask is not None and plan is not None else "entry"
    module.eam_frozen_mask = mask
    module.eam_frozen_values = values
    if mask is None or plan is None:
        return
    m4 = mask if mask.dim() == 4 else mask.unsqueeze(0)  # (G, H, N, N)
    frozen_units = _frozen_units(module, m4, plan)
    if executes_plans(module, plan):  # else simulated: the whole-unit mask is applied as entry freezing is
        _set_plan(module, frozen_units, values.to(mask.device), plan, execute)


def _set_plan(module: nn.Module, units: torch.Tensor, values: torch.Tensor, plan: str, execute: bool) -> None:
    """The plan buffers: kept/frozen units (all a cost account needs when not executed), the order back to
    timm's, the frozen units' maps (:func:`~eamvit.modules.adapters.frozen_times_v`'s layout), and for sliced
    heads the qkv weight rows (q, k, v of the kept heads, then v of the frozen ones) and ``proj`` columns."""
    keep, frozen = (~units).nonzero().flatten(), units.nonzero().flatten()
    module.eam_plan_keep, module.eam_plan_frozen = keep, frozen
    if not execute:
        return
    adapter = module.eam.adapter
    module.eam_plan_order = torch.argsort(torch.cat([keep, frozen]))  # original unit -> position in plan order
    raw = values if module.eam.num_windows > 1 else values.unsqueeze(0)
    at = raw.dim() - (3 if plan == "head" else 2)  # heads at -3, query rows at -2 of the layer map
    if adapter.heads_at is not None:
        raw, at = raw.movedim(at, adapter.heads_at), adapter.heads_at
    module.eam_plan_values = raw.index_select(at, frozen).contiguous().float()
    if adapter.heads == "sliced" and plan == "head":
        H = units.numel()
        d, dev = module.qkv.weight.shape[0] // (3 * H), values.device
        heads = lambda idx, part: (part * H * d + idx.view(-1, 1) * d + torch.arange(d, device=dev)).flatten()
        module.eam_plan_wrows = torch.cat([heads(keep, 0), heads(keep, 1), heads(keep, 2), heads(frozen, 2)])
        module.eam_plan_cols_k, module.eam_plan_cols_f = heads(keep, 0), heads(frozen, 0)
    module.eam.plan = plan


attention_layers = instrument  # the instrumented attention modules (instrument is idempotent)


@contextlib.contextmanager
def observe(model: nn.Module, observers: Mapping[int, Observer], *,
            stage: Stage = "softmax") -> Iterator[list[nn.Module]]:
    """Call ``observers[layer](attn, mask)`` on every forward of that attention layer inside the block.

    The one way eamvit reads attention maps. Observers nest: one attached by an enclosing ``observe`` keeps
    running (after the inner one), and each block restores exactly what it found. Layers without an observer
    keep timm's fused attention. Yields the instrumented attention modules, index = layer number. ``stage``:
    ``"softmax"`` (the attention map), ``"quantized"`` (after the post-softmax quantizer) or ``"keys"`` (the
    keys, ``(B, H, N, d)``, in place of the map; ``mask`` is ``None``).
    """
    layers = _layers(model, observers)
    if stage == "keys":
        require([layers[l] for l in observers], "merge")
    with observing(layers, observers, _STAGE_ATTR[stage]):
        yield layers


def _layers(model: nn.Module, chosen: Mapping[int, object]) -> list[nn.Module]:
    layers = attention_layers(model)
    bad = [l for l in chosen if not 0 <= l < len(layers)]
    if bad:
        raise EamError(f"attention layer {bad[0]} does not exist; the model has layers 0..{len(layers) - 1}")
    return layers


@contextlib.contextmanager
def bias_scores(model: nn.Module, biases: Mapping[int, Optional[torch.Tensor]]) -> Iterator[list[nn.Module]]:
    """Add ``biases[layer]`` to that layer's attention scores before the softmax, inside the block.

    Nesting, layers without one and what it yields as :func:`observe`; ``None`` adds nothing. Each bias broadcasts
    to the layer's ``(B, H, N_q, N_k)`` scores (proportional attention: ``(B, 1, 1, N)``).
    """
    layers = _layers(model, biases)
    require([layers[l] for l in biases if biases[l] is not None], "merge")
    with biasing(layers, biases):
        yield layers


def layer_shapes(model: nn.Module, sample: torch.Tensor | Callable[[], Any]) -> list[tuple[int, ...]]:
    """Per-layer attention-map shape, ``(H, N, N)`` or ``(nW, H, N, N)``, from one forward of ``sample``:
    images (the first one is run), or ``f()`` that runs ``model`` once."""
    shapes: dict[int, tuple[int, ...]] = {}

    def make(i: int) -> Observer:
        def obs(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
            shapes[i] = tuple(attn.shape[1:])
        return obs

    n = len(attention_layers(model))
    with observe(model, {l: make(l) for l in range(n)}), torch.no_grad():
        sample() if callable(sample) else model(sample[:1])
    missing = [l for l in range(n) if l not in shapes]
    if missing:
        raise EamError(f"the model's forward did not run attention layer {missing[0]}; every attention layer must "
                       "run on every forward")
    return [shapes[l] for l in range(n)]
