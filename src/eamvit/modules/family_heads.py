"""Executed head freezing for the attention classes of :mod:`eamvit.modules.families`, per head mode.
See docs/architecture-modules.md."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from eamvit.errors import EamError
from eamvit.modules.adapters import frozen_times_v

_SOFTMAXES = frozenset({torch.softmax, torch.Tensor.softmax, F.softmax})
_MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm})
_SDPA = F.scaled_dot_product_attention


class KeptBiases:
    """LeViT / EfficientFormer: while frozen heads are executed, the learned biases of the kept heads only."""

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        biases = super().get_attention_biases(device)
        return biases.index_select(0, self.eam_plan_keep) if self.eam_executes_plan else biases


def with_frozen(module: nn.Module, kept: Optional[torch.Tensor], v: torch.Tensor, h: int) -> torch.Tensor:
    """The kept heads' attention output (``None``: every head frozen) and the frozen heads' ``A^μ·V`` from ``v``
    (all heads' values), heads at dim ``h``, back in timm's head order."""
    frozen = frozen_times_v(module.eam_plan_values, v.index_select(h, module.eam_plan_frozen)).flatten(0, 1)
    both = frozen if kept is None else torch.cat([kept, frozen], dim=h)
    return both.index_select(h, module.eam_plan_order)


class HeadTap(TorchFunctionMode):
    """Inside one timm forward of ``module``: the attention of the kept heads, ``A^μ·V`` for the frozen ones;
    the adapter's head mode says whether the tap serves the fused call or the score and output matmuls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        adapter = module.eam.adapter
        self.module, self.keep = module, module.eam_plan_keep
        self.cut_einsum, self.sdpa, self.heads_at = adapter.cut_einsum, adapter.heads == "sdpa", adapter.heads_at
        self.fused = self.scores = self.softmaxes = self.outputs = 0

    def _dim(self, t: torch.Tensor) -> int:
        return t.dim() - 3 if self.heads_at is None else self.heads_at

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.sdpa and func is _SDPA:
            self.fused += 1
            return self._fused(*args, **kwargs)
        if self.cut_einsum and func is torch.einsum and self.scores == 1 and self.softmaxes == 0:
            # MViTv2's relative position: a term per head from the queries (heads at dim 1), kept heads only
            return func(args[0], args[1].index_select(1, self.keep), *args[2:])
        if not self.sdpa and func in _MATMULS and self.outputs == 0:
            a, b = args[0], args[1]
            if self.softmaxes == 0 and self.scores == 0:
                self.scores += 1
                h = self._dim(a)
                return func(a.index_select(h, self.keep), b.index_select(h, self.keep))
            if self.softmaxes == 1:
                self.outputs += 1
                if a.shape[self._dim(a)] == self.keep.numel():  # attn @ v
                    return self._combine(func(a, self._kept(b)), b)
                # v @ attnᵀ (LeViT's conv layout): the same product, transposed
                kept = func(self._kept(a), b).transpose(-2, -1)
                return self._combine(kept, a.transpose(-2, -1)).transpose(-2, -1).contiguous()
        out = func(*args, **kwargs)
        if func in _SOFTMAXES:
            self.softmaxes += 1
        return out

    def _kept(self, v: torch.Tensor) -> torch.Tensor:
        return v.index_select(self._dim(v), self.keep)

    def _combine(self, kept: Optional[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        return with_frozen(self.module, kept, v, self._dim(v))

    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
               **kwargs) -> torch.Tensor:
        kept = None
        if self.keep.numel():
            h = self._dim(q)
            if attn_mask is not None:
                at = h - (q.dim() - attn_mask.dim())  # the mask broadcasts from the right
                if at >= 0 and attn_mask.shape[at] > 1:
                    attn_mask = attn_mask.index_select(at, self.keep)
            kept = _SDPA(self._kept(q), self._kept(k), self._kept(v), attn_mask=attn_mask, **kwargs)
        return self._combine(kept, v)

    def check(self, cls: type) -> None:
        """Refuse a forward that did not compute what the executed path expects (a timm change)."""
        done = self.fused == 1 if self.sdpa else (self.scores, self.softmaxes, self.outputs) == (1, 1, 1)
        if not done:
            what = f"{self.fused} fused attention calls" if self.sdpa else \
                f"{self.scores} score matmuls, {self.softmaxes} softmaxes and {self.outputs} output matmuls"
            raise EamError(f"timm {cls.__module__}.{cls.__name__} computed {what} where executed head freezing "
                           "expects one of each; this timm version is not supported for executed heads")


def run_heads(module: nn.Module, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``run()`` (timm's forward) with the frozen heads executed as ``A^μ·V`` (:class:`HeadTap`)."""
    if not module.eam_plan_frozen.numel():  # nothing frozen: timm's forward as it is
        return run()
    tap = HeadTap(module)
    return run_tapped(module, tap, run, tap.sdpa)  # the fused path is the one the tap serves


def run_tapped(module: nn.Module, tap: TorchFunctionMode, run: Callable[[], Any], fused: bool) -> Any:
    """``run()`` inside ``tap`` with ``module.fused_attn`` set to ``fused`` for the call, then the tap's check."""
    was = getattr(module, "fused_attn", None)
    try:
        if was is not None:
            module.fused_attn = fused
        with tap:
            out = run()
    finally:
        if was is not None:
            module.fused_attn = was
    tap.check(module.eam.adapter.timm_class)
    return out


def swinv2_heads(module: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Swin v2 ``WindowAttention`` with the frozen heads executed, ``(B·nW, N, C)`` in and out: the kept heads
    get timm's cosine scores, logit scales, position biases, window mask and softmax; the frozen heads only values."""
    B_, N, C = x.shape
    H, keep = module.num_heads, module.eam_plan_keep
    if module.q_bias is None:
        qkv = module.qkv(x)
    else:
        bias = torch.cat((module.q_bias, module.k_bias, module.v_bias))
        qkv = module.qkv(x) + bias if module.qkv_bias_separate else F.linear(x, module.qkv.weight, bias)
    q, k, v = qkv.view(B_, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
    kept = None
    if keep.numel():
        q, k = F.normalize(q.index_select(1, keep), dim=-1), F.normalize(k.index_select(1, keep), dim=-1)
        scale = torch.clamp(module.logit_scale, max=math.log(1.0 / 0.01)).exp().index_select(0, keep)
        table = module.cpb_mlp(module.relative_coords_table).view(-1, H)
        pos = table[module.relative_position_index.view(-1)].view(N, N, H).permute(2, 0, 1).index_select(0, keep)
        attn = (q @ k.transpose(-2, -1)) * scale + 16 * torch.sigmoid(pos)
        if mask is not None:
            win = mask.shape[0]
            attn = (attn.view(-1, win, keep.numel(), N, N) + mask.unsqueeze(1).unsqueeze(0)).view(attn.shape)
        kept = module.softmax(attn) @ v.index_select(1, keep)
    out = with_frozen(module, kept, v, 1).transpose(1, 2).reshape(B_, N, C)
    return module.proj_drop(module.proj(out))


def gpsa_heads(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ConViT ``GPSA`` with the frozen heads executed, ``(B, N, C)`` in and out: the kept heads get timm's two
    softmaxes, their own gates and the renormalisation; the frozen heads only their values."""
    B, N, C = x.shape
    H, keep = module.num_heads, module.eam_plan_keep
    if module.rel_indices is None or module.rel_indices.shape[1] != N:
        module.rel_indices = module.get_rel_indices(N)
    v = module.v(x).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
    kept = None
    if keep.numel():
        q, k = module.qk(x).reshape(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4).index_select(2, keep).unbind(0)
        pos = module.pos_proj(module.rel_indices.expand(B, -1, -1, -1)).permute(0, 3, 1, 2).index_select(1, keep)
        gate = torch.sigmoid(module.gating_param.index_select(0, keep)).view(1, -1, 1, 1)
        patch = ((q @ k.transpose(-2, -1)) * module.scale).softmax(dim=-1)
        attn = (1.0 - gate) * patch + gate * pos.softmax(dim=-1)
        kept = (attn / attn.sum(dim=-1, keepdim=True)) @ v.index_select(1, keep)
    out = with_frozen(module, kept, v, 1).transpose(1, 2).reshape(B, N, C)
    return module.proj_drop(module.proj(out))
