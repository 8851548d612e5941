"""The one attention instrumentation of eamvit.

timm's ``Attention`` (ViT, DeiT, DeiT-distilled) and Swin v1's ``WindowAttention`` are swapped, by
class, for subclasses that can expose the post-softmax attention map ``A`` and replace entries of it
(ToMe-style surgery: ``module.__class__ = ...``; no weights copied, no per-instance ``forward``
patching, no module-name matching). Everything else in the project (entropy calibration, freezing,
quantization, token pruning) talks to attention through the three attributes set here:

* observers, attached only through :func:`observe` (a context manager that always clears itself):
  a callable ``f(attn, mask)`` that receives ``A`` as ``(B, *layer_shape)`` (the live
  tensor, so gradients can flow through what an observer computes, e.g. EViT's fused token; an
  observer that only records statistics detaches), where
  ``layer_shape`` is ``(H, N, N)`` for ViT and ``(nW, H, N, N)`` for Swin (each window position is
  its own variable); ``mask`` is Swin's shifted-window additive mask ``(nW, N, N)`` or ``None``.
  ``stage="softmax"`` sees ``A`` right after the softmax, ``stage="quantized"`` after the
  post-softmax quantizer (ADFQ-ViT's reconstruction loss reads that one).
* ``eam_frozen_mask`` / ``eam_frozen_values``: buffers of ``layer_shape``; where the mask is true,
  ``A`` takes the frozen value (eq. 15 of the EAM paper).
* ``eam_quant``: an optional module with ``q``, ``k``, ``v``, ``attn`` callables and a
  ``scale_first`` flag, used by :mod:`eamvit.methods.repq` to quantize the two attention matmuls.

A module with none of them set runs timm's own (fused) forward, so blocks that need no attention map
keep their speed.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Literal, Mapping, Optional

import torch
from torch import nn

from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

from eamvit.errors import EamError

Observer = Callable[[torch.Tensor, Optional[torch.Tensor]], None]
Stage = Literal["softmax", "quantized"]
_STAGE_ATTR = {"softmax": "eam_observer", "quantized": "eam_observer_q"}

SUPPORTED_FAMILIES = "timm ViT / DeiT / DeiT-distilled (timm Attention) and Swin v1 (WindowAttention)"


class _EamMixin:
    """State and the post-softmax step shared by both instrumented classes."""

    eam_layer: int
    eam_observer: Optional[Observer]
    eam_observer_q: Optional[Observer]
    eam_quant: Optional[nn.Module]
    eam_frozen_mask: Optional[torch.Tensor]
    eam_frozen_values: Optional[torch.Tensor]

    def _eam_init(self, layer: int) -> None:
        self.eam_layer = layer
        self.eam_observer = None
        self.eam_observer_q = None
        self.eam_quant = None
        # Non-persistent: a model's state_dict stays loadable by plain timm.
        self.register_buffer("eam_frozen_mask", None, persistent=False)
        self.register_buffer("eam_frozen_values", None, persistent=False)

    @property
    def eam_active(self) -> bool:
        return (self.eam_observer is not None or self.eam_observer_q is not None or self.eam_quant is not None
                or self.eam_frozen_mask is not None)

    def _eam_post_softmax(self, attn: torch.Tensor, groups: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Observe, quantize and freeze ``attn`` of shape ``(B*groups, H, N, N)``."""
        shape5 = (-1, groups) + tuple(attn.shape[1:]) if groups > 1 else None
        if self.eam_observer is not None:
            view = attn.view(shape5) if shape5 else attn
            self.eam_observer(view, mask)
        if self.eam_quant is not None:
            attn = self.eam_quant.attn(attn)
        if self.eam_observer_q is not None:
            self.eam_observer_q(attn.view(shape5) if shape5 else attn, mask)
        if self.eam_frozen_mask is not None:
            view = attn.view(shape5) if shape5 else attn
            view = torch.where(self.eam_frozen_mask, self.eam_frozen_values.to(attn.dtype), view)
            attn = view.reshape(attn.shape)
        return attn

    def _eam_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``q @ kᵀ`` scaled; with quantizers, in the order the quantizer asks for."""
        qz = self.eam_quant
        if qz is None or qz.scale_first:
            q = q * self.scale
            if qz is not None:
                q, k = qz.q(q), qz.k(k)
            return q @ k.transpose(-2, -1)
        # RepQ-ViT's ViT order: quantize q and k, multiply, then scale.
        return (qz.q(q) @ qz.k(k).transpose(-2, -1)) * self.scale


class EamAttention(_EamMixin, Attention):
    """timm ``Attention`` with an explicit, hookable attention map when one is needed."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if not self.eam_active:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self._eam_scores(q, k)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = attn.softmax(dim=-1)
        attn = self._eam_post_softmax(attn, 1, None)
        attn = self.attn_drop(attn)
        if self.eam_quant is not None:
            v = self.eam_quant.v(v)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class EamWindowAttention(_EamMixin, WindowAttention):
    """Swin v1 ``WindowAttention``; ``eam_num_windows`` is set from the owning block."""

    eam_num_windows: int = 1

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.eam_active:
            return super().forward(x, mask=mask)
        B_, N, C = x.shape
        num_win = mask.shape[0] if mask is not None else self.eam_num_windows
        if B_ % num_win:
            raise EamError(f"Swin layer {self.eam_layer}: {B_} windows is not a multiple of {num_win} per image; "
                           "run the model at the image size it was instrumented for")
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self._eam_scores(q, k)
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self._eam_post_softmax(attn, num_win, mask)
        attn = self.attn_drop(attn)
        if self.eam_quant is not None:
            v = self.eam_quant.v(v)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


# Exact-type registry: a subclass of timm's Attention with its own forward is not assumed compatible.
_SWAP: dict[type, type] = {Attention: EamAttention, WindowAttention: EamWindowAttention}


def _swin_num_windows(block: SwinTransformerBlock) -> int:
    h, w = block.input_resolution
    wh, ww = block.window_size
    return math.ceil(h / wh) * math.ceil(w / ww)


def instrument(model: nn.Module) -> list[nn.Module]:
    """Swap every supported attention module of ``model`` for its instrumented class, in place.

    Idempotent. Layers are numbered in module order (block order for ViT, stage then block for Swin).

    Args:
        model: a timm model.

    Returns:
        The instrumented attention modules, index = layer number.

    Raises:
        EamError: the model has no supported attention module.
    """
    layers: list[nn.Module] = []
    for module in model.modules():
        cls = type(module)
        if cls in (EamAttention, EamWindowAttention):
            layers.append(module)
        elif cls in _SWAP:
            module.__class__ = _SWAP[cls]
            module._eam_init(len(layers))
            layers.append(module)
    if not layers:
        raise EamError(f"unsupported model {type(model).__name__}: eamvit supports {SUPPORTED_FAMILIES}")
    for module in model.modules():
        if isinstance(module, SwinTransformerBlock) and isinstance(module.attn, EamWindowAttention):
            module.attn.eam_num_windows = _swin_num_windows(module)
    return layers


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
    saved = {l: getattr(layers[l], attr) for l in observers}
    try:
        for l, fn in observers.items():
            setattr(layers[l], attr, fn if saved[l] is None else _chain(fn, saved[l]))
        yield layers
    finally:
        for l, prev in saved.items():
            setattr(layers[l], attr, prev)


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
