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
* ``eam_plan``: ``"head"`` or ``"row"`` when the frozen mask covers whole heads or whole query rows
  and that structure is to be *executed* (:func:`set_frozen`). A frozen head's output is then
  ``A^μ_h·V_h``: its query and key rows are sliced out of the fused ``qkv`` weight and its scores and
  softmax are never computed; a frozen row skips its query projection, scores and softmax. The kept
  part runs timm's fused kernel when the module uses it. Whenever something needs the whole map
  (an observer, quantized attention, attention dropout in training, a caller's mask) the module
  falls back to the simulated ``torch.where`` path, which gives the same numbers.

A module with none of them set runs timm's own (fused) forward, so blocks that need no attention map
keep their speed.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

from eamvit.errors import EamError

Observer = Callable[[torch.Tensor, Optional[torch.Tensor]], None]
Stage = Literal["softmax", "quantized"]
_STAGE_ATTR = {"softmax": "eam_observer", "quantized": "eam_observer_q"}

SUPPORTED_FAMILIES = "timm ViT / DeiT / DeiT-distilled (timm Attention) and Swin v1 (WindowAttention)"


def _may_overwrite() -> bool:
    """Whether a fresh intermediate may be overwritten in place: not under autograd, and not while
    tracing for export (ONNX has no in-place softmax/where)."""
    return not torch.is_grad_enabled() and not torch.jit.is_tracing()


class _EamMixin:
    """State and the post-softmax step shared by both instrumented classes."""

    eam_layer: int
    eam_observer: Optional[Observer]
    eam_observer_q: Optional[Observer]
    eam_quant: Optional[nn.Module]
    eam_frozen_mask: Optional[torch.Tensor]
    eam_frozen_values: Optional[torch.Tensor]
    eam_plan: Optional[str]

    def _eam_init(self, layer: int) -> None:
        self.eam_layer = layer
        self.eam_observer = None
        self.eam_observer_q = None
        self.eam_quant = None
        self.eam_plan = None
        self.eam_granularity = "entry"
        # Non-persistent: a model's state_dict stays loadable by plain timm.
        for name in ("eam_frozen_mask", "eam_frozen_values") + _PLAN_BUFFERS:
            self.register_buffer(name, None, persistent=False)

    @property
    def eam_executes_plan(self) -> bool:
        """True when the next forward skips the frozen heads/rows instead of simulating them."""
        # Exact nn.Linear only: a quantized linear's forward must not be bypassed by F.linear.
        return (self.eam_plan is not None and self.eam_frozen_mask is not None and self.eam_observer is None
                and self.eam_observer_q is None and self.eam_quant is None
                and not (self.training and self.attn_drop.p > 0)
                and type(self.qkv) is nn.Linear and type(self.proj) is nn.Linear)

    def _eam_weight(self, key: str, make: Callable[[], torch.Tensor], *sources: torch.Tensor) -> torch.Tensor:
        """A slice of a weight taken for a plan: recomputed (differentiably) while training, cached for
        inference until a source tensor changes (in-place updates bump its version, moves its storage)."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return make()
        stamp = tuple((t._version, t.data_ptr()) for t in sources)
        cache = self.__dict__.setdefault("_eam_cache", {})
        hit = cache.get(key)
        if hit is None or hit[0] != stamp:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable by autograd later
                hit = cache[key] = (stamp, make())
        return hit[1]

    def _eam_heads(self, x: torch.Tensor, bias: Optional[torch.Tensor],
                   windows: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Executed head freezing, ``(B_, N, C)`` in: the attention outputs of the kept heads
        ``(B_, N, Hk·d)`` (``None`` if none) and of the frozen heads ``(B_, N, Hf·d)``, before ``proj``."""
        B_, N, _ = x.shape
        H, d = self.num_heads, self.qkv.weight.shape[0] // (3 * self.num_heads)
        keep, rows = self.eam_plan_keep, self.eam_plan_wrows
        hk = keep.numel()
        qkv = self.qkv
        w = self._eam_weight("qkv.weight", lambda: qkv.weight.index_select(0, rows), qkv.weight)
        b = None if qkv.bias is None else self._eam_weight("qkv.bias", lambda: qkv.bias.index_select(0, rows), qkv.bias)
        y = F.linear(x, w, b)  # q, k of the kept heads, then v of the kept heads, then v of the frozen ones
        q, k, vk, vf = y.split([hk * d, hk * d, hk * d, (H - hk) * d], dim=-1)
        kept = None
        if hk:
            q, k, vk = (t.view(B_, N, hk, d).transpose(1, 2) for t in (q, k, vk))
            if bias is not None:
                bias = bias.index_select(-3, keep)
            kept = self._eam_kept_attention(q, k, vk, bias).transpose(1, 2).reshape(B_, N, hk * d)
        frozen = _frozen_heads_times_v(self.eam_plan_values, vf.view(B_, N, H - hk, d), windows)
        return kept, frozen.reshape(B_, N, (H - hk) * d)

    def _eam_proj(self, kept: Optional[torch.Tensor], frozen: torch.Tensor) -> torch.Tensor:
        """``proj`` of the two head groups without reassembling them: each multiplies its own
        columns of the projection (the kept heads' product is accumulated into the frozen ones')."""
        p = self.proj
        wf = self._eam_weight("proj.frozen", lambda: p.weight.index_select(1, self.eam_plan_cols_f), p.weight)
        if kept is None:
            return F.linear(frozen, wf, p.bias)
        wk = self._eam_weight("proj.kept", lambda: p.weight.index_select(1, self.eam_plan_cols_k), p.weight)
        out = F.linear(kept, wk, p.bias)
        flat, xf = out.view(-1, out.shape[-1]), frozen.reshape(-1, frozen.shape[-1])
        if not _may_overwrite():
            return torch.addmm(flat, xf, wf.t()).view(out.shape)
        torch.addmm(flat, xf, wf.t(), out=flat)  # in place, in the form op counters see
        return out

    def _eam_in_head_order(self, kept: Optional[torch.Tensor], frozen: torch.Tensor) -> torch.Tensor:
        """The two head groups back in timm's head order, ``(B_, N, A)`` (for a scale norm or gate)."""
        parts = [frozen] if kept is None else [kept, frozen]
        x = torch.cat(parts, dim=-1)
        B_, N, A = x.shape
        return x.view(B_, N, self.num_heads, -1).index_select(2, self.eam_plan_order).view(B_, N, A)

    def _eam_kept_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``softmax(q·kᵀ·scale + bias)·v`` for the computed heads/rows, fused when timm fuses."""
        if getattr(self, "q_norm", None) is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        return attn.softmax(dim=-1) @ v

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
            values = self.eam_frozen_values.to(attn.dtype)
            # Without autograd and with no observer holding the map, overwrite it in place: the same
            # numbers without allocating another (B, H, N, N) map.
            in_place = _may_overwrite() and self.eam_observer is None and self.eam_observer_q is None
            view = torch.where(self.eam_frozen_mask, values, view, out=view) if in_place else \
                torch.where(self.eam_frozen_mask, values, view)
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


_PLAN_BUFFERS = ("eam_plan_keep", "eam_plan_frozen", "eam_plan_values", "eam_plan_wrows", "eam_plan_order",
                 "eam_plan_cols_k", "eam_plan_cols_f")


def _frozen_heads_times_v(values: torch.Tensor, v: torch.Tensor, windows: int) -> torch.Tensor:
    """``A^μ_h · V_h`` for every frozen head of every window, as one batched matmul.

    Args:
        values: ``(G·Hf, N, N)`` frozen maps, window-major.
        v: ``(B·G, N, Hf, d)`` values of the frozen heads (timm's window order: image-major).
        windows: ``G``.

    Returns:
        ``(B·G, N, Hf, d)``.
    """
    BG, N, hf, d = v.shape
    B = BG // windows
    # Put the images next to the head width so that one (N×N)·(N×B·d) product serves the batch:
    # the frozen map is shared by all images and is never expanded.
    vv = v.reshape(B, windows, N, hf, d).permute(1, 3, 2, 0, 4).reshape(windows * hf, N, B * d)
    o = torch.bmm(values.to(vv.dtype), vv)
    return o.view(windows, hf, N, B, d).permute(3, 0, 2, 1, 4).reshape(BG, N, hf, d)


class EamAttention(_EamMixin, Attention):
    """timm ``Attention`` with an explicit, hookable attention map when one is needed."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if not self.eam_active:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        if self.eam_executes_plan and attn_mask is None and not is_causal:
            if self.eam_plan == "row":
                return self._eam_out(self._eam_rows(x), gate)
            kept, frozen = self._eam_heads(x, None, 1)
            if gate is None and isinstance(self.norm, nn.Identity):
                return self.proj_drop(self._eam_proj(kept, frozen))
            return self._eam_out(self._eam_in_head_order(kept, frozen), gate)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self._eam_scores(q, k)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        # The scores are a fresh tensor: without autograd the softmax may overwrite them (same numbers).
        # Not while tracing for export: ONNX has no in-place softmax.
        in_place = _may_overwrite()
        attn = torch.softmax(attn, -1, out=attn) if in_place else attn.softmax(dim=-1)
        attn = self._eam_post_softmax(attn, 1, None)
        attn = self.attn_drop(attn)
        if self.eam_quant is not None:
            v = self.eam_quant.v(v)
        x = attn @ v
        return self._eam_out(x.transpose(1, 2).reshape(B, N, self.attn_dim), gate)

    def _eam_out(self, x: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def _eam_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Executed row freezing: only the kept query rows get a query, scores and a softmax."""
        B, N, _ = x.shape
        H, d, A = self.num_heads, self.head_dim, self.attn_dim
        keep, frozen = self.eam_plan_keep, self.eam_plan_frozen
        w, b = self.qkv.weight, self.qkv.bias
        # Slices of the fused weight are views: no weight is copied.
        kv = F.linear(x, w[A:], b[A:] if b is not None else None)
        k, v = kv.view(B, N, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        parts = []
        if keep.numel():
            q = F.linear(x.index_select(1, keep), w[:A], b[:A] if b is not None else None)
            q = q.view(B, keep.numel(), H, d).transpose(1, 2)
            parts.append(self._eam_kept_attention(q, k, v, None).transpose(1, 2))  # (B, R, H, d)
        # Frozen rows: A^μ[h, rows] · V_h, the batch folded into the columns of one product per head.
        vv = v.permute(1, 2, 0, 3).reshape(H, N, B * d)
        fo = torch.bmm(self.eam_plan_values.to(vv.dtype), vv).view(H, frozen.numel(), B, d)
        parts.append(fo.permute(2, 1, 0, 3))  # (B, F, H, d)
        # Rows come out kept-then-frozen; one gather puts the tokens back in order.
        return torch.cat(parts, dim=1).view(B, N, A).index_select(1, self.eam_plan_order)


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
        if self.eam_executes_plan:  # only "head" plans exist for Swin (set_frozen refuses rows)
            kept, frozen = self._eam_heads(x, self._eam_window_bias(B_, N, mask), num_win)
            return self.proj_drop(self._eam_proj(kept, frozen))
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

    def _eam_window_bias(self, B_: int, N: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Relative-position bias plus the shifted-window mask, ``(B_ or 1, H, N, N)`` (timm's fused form)."""
        bias = self._get_rel_pos_bias()
        if mask is None:
            return bias
        num_win = mask.shape[0]
        mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, self.num_heads, -1, -1)
        return bias + mask.reshape(-1, self.num_heads, N, N)


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
        EamError: the model has no supported attention module, or attention eamvit cannot instrument.
    """
    # Attention eamvit cannot see (CrossViT's CrossAttention) would leave the maps part of the model's.
    other = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Attention")}
                   - {c.__name__ for c in (*_SWAP, EamAttention, EamWindowAttention)})
    if other:
        raise EamError(f"unsupported model {type(model).__name__}: its {', '.join(other)} modules are not supported; "
                       f"eamvit supports {SUPPORTED_FAMILIES}")
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


PLANS = ("head", "row")


def _frozen_units(module: nn.Module, m4: torch.Tensor, plan: str) -> torch.Tensor:
    """Which heads ``(H,)`` or query rows ``(N,)`` a ``(G, H, N, N)`` mask freezes whole; refuses a mask
    that freezes anything else."""
    if plan == "head":
        units = m4.flatten(2).all(-1).all(0)
        covered = units.view(1, -1, 1, 1).expand_as(m4)
    else:
        if isinstance(module, EamWindowAttention):
            raise EamError("row granularity is not available for Swin: a row there is one (window, token) pair, so "
                           "windows would keep different numbers of rows; use entry or head")
        units = m4[0].all(-1).all(0)
        covered = units.view(1, 1, -1, 1).expand_as(m4)
    if not torch.equal(covered, m4):
        raise EamError(f"layer {module.eam_layer}: the frozen mask does not cover whole {plan}s; "
                       f"freeze with granularity {plan!r}")
    return units


def set_frozen(module: nn.Module, mask: Optional[torch.Tensor], values: Optional[torch.Tensor],
               plan: Optional[str] = None, execute: bool = True) -> None:
    """Freeze entries of one instrumented attention layer (``mask=None`` unfreezes it).

    Args:
        module: an instrumented attention module.
        mask: bool, the layer's attention shape ``(H, N, N)`` or ``(nW, H, N, N)``: entries to freeze.
        values: the frozen values, same shape.
        plan: ``None`` (entries, simulated with ``torch.where``), ``"head"`` (the mask must cover
            whole heads, every window) or ``"row"`` (whole query rows of every head; ViT only).
        execute: skip the work of a ``plan``'s frozen units; ``False`` simulates them (recorded in
            ``eam_granularity`` so that a cost account can say what executing would save).

    Raises:
        EamError: a plan the mask does not match, or ``"row"`` on Swin.
    """
    for name in _PLAN_BUFFERS:
        setattr(module, name, None)
    module.eam_plan = None
    module.eam_granularity = plan if mask is not None and plan is not None else "entry"
    module.eam_frozen_mask = mask
    module.eam_frozen_values = values
    if mask is None or plan is None:
        return
    if plan not in PLANS:
        raise EamError(f"frozen-attention plan {plan!r} is not one of {', '.join(PLANS)}")
    dev = mask.device
    m4 = mask if mask.dim() == 4 else mask.unsqueeze(0)  # (G, H, N, N)
    v4 = values.to(dev) if values.dim() == 4 else values.to(dev).unsqueeze(0)
    H = m4.shape[1]
    frozen_units = _frozen_units(module, m4, plan)
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
        for name in _PLAN_BUFFERS[2:]:
            setattr(module, name, None)
        return
    module.__dict__.pop("_eam_cache", None)
    module.eam_plan = plan


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
