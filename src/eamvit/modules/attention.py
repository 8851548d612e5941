"""The one attention instrumentation of eamvit.

Every supported timm attention class is swapped, by exact class, for an instrumented subclass that
can expose the post-softmax attention map ``A`` and replace entries of it (ToMe-style surgery:
``module.__class__ = ...``; no weights copied, no per-instance ``forward`` patching, no module-name
matching). Which classes are supported, and what each supports, is the registry of *adapters*
(:mod:`eamvit.modules.adapters`): the ViT family's ``Attention`` and Swin v1's ``WindowAttention``
(:mod:`eamvit.modules.vit_swin`, with every verb) and the further families of
:mod:`eamvit.modules.families` (the verbs each adapter declares). Everything else in the project (entropy
calibration, freezing, quantization, token pruning) talks to attention through the state set here,
one :class:`~eamvit.modules.adapters.EamState` per module (``module.eam``) plus the tensors it
registers on the module:

* observers (``eam.observer``, ``eam.observer_q``), attached only through :func:`observe` (a context manager that always clears itself):
  a callable ``f(attn, mask)`` that receives ``A`` as ``(B, *layer_shape)`` (the live
  tensor, so gradients can flow through what an observer computes, e.g. EViT's fused token; an
  observer that only records statistics detaches), where ``layer_shape`` is the adapter's
  ``(…, N_q, N_k)`` with heads at dim -3: ``(H, N, N)`` for ViT, ``(nW, H, N, N)`` for Swin (each
  window position is its own variable), ``(H, 1, N)`` for class attention, ``(H, N_q, N_k)`` for
  pooled keys; ``mask`` is Swin's shifted-window additive mask ``(nW, N, N)`` or ``None``.
  ``stage="softmax"`` sees ``A`` right after the softmax, ``stage="quantized"`` after the
  post-softmax quantizer (ADFQ-ViT's reconstruction loss reads that one).
* ``eam_frozen_mask`` / ``eam_frozen_values``: non-persistent buffers of ``layer_shape``; where the mask is true,
  ``A`` takes the frozen value (eq. 15 of the EAM paper).
* ``eam_quant``: an optional submodule (its ``state_dict`` keys are a quantized file's) with ``q``, ``k``, ``v``, ``attn`` callables and a
  ``scale_first`` flag, used by :mod:`eamvit.methods.repq` to quantize the two attention matmuls.
* ``eam.plan``: ``"head"`` or ``"row"`` when the frozen mask covers whole heads or whole query rows
  and that structure is to be *executed* (:func:`set_frozen`; rows in ViT only, heads wherever the
  adapter declares executed heads: :mod:`eamvit.modules.family_heads` for the further families).

A module with none of them set runs timm's own (fused) forward, so blocks that need no attention map
keep their speed. A model with an attention class outside the registry is refused in one line.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Literal, Mapping, Optional

import torch
from torch import nn

from eamvit.errors import EamError
from eamvit.modules import families, vit_swin
from eamvit.modules.adapters import Adapter, Observer, capability_table, families_line, require
from eamvit.modules.family_heads import set_head_plan
from eamvit.modules.vit_swin import EamAttention, EamWindowAttention, window_count

__all__ = ["ADAPTERS", "EamAttention", "EamWindowAttention", "attention_layers", "executes_plans", "instrument",
           "layer_shapes", "models_table", "observe", "require", "set_frozen"]

Stage = Literal["softmax", "quantized"]
_STAGE_ATTR = {"softmax": "observer", "quantized": "observer_q"}

ADAPTERS: tuple[Adapter, ...] = vit_swin.ADAPTERS + families.ADAPTERS
# Exact-type registry: a subclass of a timm attention with its own forward is not assumed compatible.
_BY_CLASS: dict[type, Adapter] = {a.timm_class: a for a in ADAPTERS}
_INSTRUMENTED = frozenset(a.eam_class for a in ADAPTERS)


def _instrumented(cls: type) -> bool:
    """An instrumented class, or eamvit's own subclass of one (an export class that changes the graph's form)."""
    return cls in _INSTRUMENTED or any(issubclass(cls, c) for c in _INSTRUMENTED)
FAMILIES = vit_swin.FAMILIES + families.FAMILIES
SUPPORTED_FAMILIES = families_line(FAMILIES)
# Class names that say "attention": an unknown one is refused rather than left unmapped in silence.
_ATTENTION_NAME = re.compile(r"(Attention|Attn)(2d)?$|^(XCA|GPSA|MHSA)$")


def _unknown_attention(module: nn.Module) -> bool:
    cls = type(module)
    return (cls not in _BY_CLASS and not _instrumented(cls) and cls not in families.UNMAPPED
            and cls is not nn.MultiheadAttention and "Block" not in cls.__name__
            and bool(_ATTENTION_NAME.search(cls.__name__)))


def _refuse(what: str) -> EamError:
    return EamError(f"{what}: eamvit supports {SUPPORTED_FAMILIES}; `eamvit models` lists them")


def models_table() -> str:
    """The families × verbs table of the registry (markdown), as ``eamvit models`` prints it."""
    return capability_table(FAMILIES, ADAPTERS)


def instrument(model: nn.Module) -> list[nn.Module]:
    """Swap every supported attention module of ``model`` for its instrumented class, in place.

    Idempotent. Layers are numbered in module order (block order for ViT, stage then block for Swin).

    Args:
        model: a timm model, or any module that contains timm attention.

    Returns:
        The instrumented attention modules, index = layer number.

    Raises:
        EamError: the model has no supported attention module, or an attention class outside the registry.
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
    for module in model.modules():  # Swin blocks (v1, v2): windows per image, for the map's shape
        attn = getattr(module, "attn", None)
        if isinstance(attn, (EamWindowAttention, families.EamWindowAttentionV2)) and hasattr(module, "input_resolution"):
            attn.eam.num_windows = window_count(module)
    families.bind(model)
    return layers


PLANS = ("head", "row")


def _frozen_units(module: nn.Module, m4: torch.Tensor, plan: str) -> torch.Tensor:
    """Which heads ``(H,)`` or query rows ``(N,)`` a ``(G, H, N, N)`` mask freezes whole; refuses a mask
    that freezes anything else."""
    if plan == "head":
        units = m4.flatten(2).all(-1).all(0)
        covered = units.view(1, -1, 1, 1).expand_as(m4)
    else:
        units = m4[0].all(-1).all(0)
        covered = units.view(1, 1, -1, 1).expand_as(m4)
    if not torch.equal(covered, m4):
        raise EamError(f"layer {module.eam.layer}: the frozen mask does not cover whole {plan}s; "
                       f"freeze with granularity {plan!r}")
    return units


def executes_plans(module: nn.Module, plan: str = "head") -> bool:
    """Whether ``module``'s class can execute a frozen ``plan``: heads where its adapter declares executed
    heads, rows in the ViT class only; every other layer simulates whole rows and heads."""
    return "executed_head" in module.eam.adapter.verbs and (plan == "head" or isinstance(module, EamAttention))


def set_frozen(module: nn.Module, mask: Optional[torch.Tensor], values: Optional[torch.Tensor],
               plan: Optional[str] = None, execute: bool = True) -> None:
    """Freeze entries of one instrumented attention layer (``mask=None`` unfreezes it).

    Args:
        module: an instrumented attention module.
        mask: bool, the layer's attention shape ``(H, N, N)`` or ``(nW, H, N, N)``: entries to freeze.
        values: the frozen values, same shape.
        plan: ``None`` (entries, simulated with ``torch.where``), ``"head"`` (the mask must cover
            whole heads, every window) or ``"row"`` (whole query rows of every head; maps with one set of rows).
        execute: skip the work of a ``plan``'s frozen units; ``False`` simulates them (recorded in
            ``eam.granularity`` so that a cost account can say what executing would save). A module that
            cannot execute plans (:func:`executes_plans`) needs ``False`` for heads and simulates rows.

    Raises:
        EamError: a plan the mask does not match, or one the layer's adapter does not support (``"row"`` on
            Swin).
    """
    if mask is not None:
        if plan is not None and plan not in PLANS:
            raise EamError(f"frozen-attention plan {plan!r} is not one of {', '.join(PLANS)}")
        require([module], "entry" if plan is None else plan)
        if plan == "head" and execute:
            require([module], "executed_head")
    for name in module.eam_plan_buffers:
        setattr(module, name, None)
    module.eam.plan = None
    module.eam.granularity = plan if mask is not None and plan is not None else "entry"
    module.eam_frozen_mask = mask
    module.eam_frozen_values = values
    if mask is None or plan is None:
        return
    m4 = mask if mask.dim() == 4 else mask.unsqueeze(0)  # (G, H, N, N)
    frozen_units = _frozen_units(module, m4, plan)
    if not executes_plans(module, plan):  # simulated: the whole-unit mask is applied as entry freezing is
        return
    if isinstance(module, (EamAttention, EamWindowAttention)):
        _plan_vit_swin(module, frozen_units, values.to(mask.device), plan, execute)
    else:
        set_head_plan(module, frozen_units, values.to(mask.device), execute)


def _plan_vit_swin(module: nn.Module, frozen_units: torch.Tensor, values: torch.Tensor, plan: str,
                   execute: bool) -> None:
    """The plan buffers of the ViT and Swin v1 classes: kept/frozen units, the fused-weight rows and
    projection columns of a head plan, and the frozen values in the order the executed path reads them."""
    dev = values.device
    v4 = values if values.dim() == 4 else values.unsqueeze(0)  # (G, H, N, N)
    H = v4.shape[1]
    keep = (~frozen_units).nonzero().flatten()
    frozen = frozen_units.nonzero().flatten()
    module.eam_plan_keep, module.eam_plan_frozen = keep, frozen
    order = torch.cat([keep, frozen])  # plan order -> original unit
    module.eam_plan_order = torch.argsort(order)  # original unit -> position in plan order
    if plan == "head":
        d = module.qkv.weight.shape[0] // (3 * H)
        heads = lambda idx, part: (part * H * d + idx.view(-1, 1) * d + torch.arange(d, device=dev)).flatten()
        module.eam_plan_wrows = torch.cat([heads(keep, 0), heads(keep, 1), heads(keep, 2), heads(frozen, 2)])
        module.eam_plan_cols_k, module.eam_plan_cols_f = heads(keep, 0), heads(frozen, 0)  # proj input columns
        module.eam_plan_values = v4.index_select(1, frozen).flatten(0, 1).contiguous().float()
    else:
        module.eam_plan_values = v4[0].index_select(1, frozen).contiguous().float()  # (H, F, N)
    if not execute:
        for name in module.eam_plan_buffers[2:]:
            setattr(module, name, None)
        return
    module.eam.cache.clear()
    module.eam.plan = plan


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The instrumented attention modules of ``model`` (instrumenting it first if needed)."""
    return instrument(model)


def _chain(first: Observer, then: Observer) -> Observer:
    def both(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        first(attn, mask)
        then(attn, mask)
    return both


@contextlib.contextmanager
def observe(model: nn.Module, observers: Mapping[int, Observer], *,
            stage: Stage = "softmax") -> Iterator[list[nn.Module]]:
    """Call ``observers[layer](attn, mask)`` on every forward of that attention layer inside the block.

    The one way eamvit reads attention maps. Observers nest: one attached by an enclosing
    ``observe`` keeps running (after the inner one), and each block restores exactly what it found,
    also when the body raises. Layers without an observer keep timm's fused attention.

    Args:
        model: a timm model (instrumented on first use).
        observers: layer number (see :func:`instrument`) to observer.
        stage: ``"softmax"`` (the attention map) or ``"quantized"`` (after the post-softmax quantizer).

    Yields:
        The instrumented attention modules, index = layer number.
    """
    layers = attention_layers(model)
    bad = [l for l in observers if not 0 <= l < len(layers)]
    if bad:
        raise EamError(f"attention layer {bad[0]} does not exist; the model has layers 0..{len(layers) - 1}")
    attr = _STAGE_ATTR[stage]
    saved = {l: getattr(layers[l].eam, attr) for l in observers}
    try:
        for l, fn in observers.items():
            setattr(layers[l].eam, attr, fn if saved[l] is None else _chain(fn, saved[l]))
        yield layers
    finally:
        for l, prev in saved.items():
            setattr(layers[l].eam, attr, prev)


def layer_shapes(model: nn.Module, sample: torch.Tensor) -> list[tuple[int, ...]]:
    """Per-layer attention-map shape, ``(H, N, N)`` or ``(nW, H, N, N)``, from one forward of ``sample``."""
    shapes: dict[int, tuple[int, ...]] = {}

    def make(i: int) -> Observer:
        def obs(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
            shapes[i] = tuple(attn.shape[1:])
        return obs

    n = len(attention_layers(model))
    with observe(model, {l: make(l) for l in range(n)}), torch.no_grad():
        model(sample[:1])
    return [shapes[i] for i in range(n)]
