"""The instrumented timm ``Attention`` (ViT family) and Swin v1 ``WindowAttention``, with executed head
and row plans. See docs/architecture-modules.md."""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.naflexvit import NaFlexEmbeds
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block

from eamvit.modules.adapters import (BASE_VERBS, Adapter, EamBase, Family, QuantFacts, TokenFamily, frozen_times_v,
                                     may_overwrite, patch_embed_size)
from eamvit.modules.family_quant import patch_merging, vit_block
from eamvit.modules.merge_block import MergeBlock
from eamvit.modules.prune_block import PruneBlock


class _EamMixin(EamBase):
    """Executed head/row plans, shared by the ViT and Swin v1 classes."""

    def _eam_heads(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Executed head freezing, ``(B_, N, C)`` in: the attention outputs of the kept heads
        ``(B_, N, Hk·d)`` (``None`` if none) and of the frozen heads ``(B_, N, Hf·d)``, before ``proj``."""
        B_, N, _ = x.shape
        H, d = self.num_heads, self.qkv.weight.shape[0] // (3 * self.num_heads)
        keep, rows = self.eam_plan_keep, self.eam_plan_wrows
        hk = keep.numel()
        qkv = self.qkv
        w = self._eam_cached("qkv.weight", lambda: qkv.weight.index_select(0, rows), qkv.weight)
        b = None if qkv.bias is None else self._eam_cached("qkv.bias", lambda: qkv.bias.index_select(0, rows), qkv.bias)
        y = F.linear(x, w, b)  # q, k of the kept heads, then v of the kept heads, then v of the frozen ones
        q, k, vk, vf = y.split([hk * d, hk * d, hk * d, (H - hk) * d], dim=-1)
        kept = None
        if hk:
            q, k, vk = (t.view(B_, N, hk, d).transpose(1, 2) for t in (q, k, vk))
            if bias is not None:
                bias = bias.index_select(-3, keep)
            kept = self._eam_kept_attention(q, k, vk, bias).transpose(1, 2).reshape(B_, N, hk * d)
        frozen = frozen_times_v(self.eam_plan_values, vf.view(B_, N, H - hk, d).transpose(1, 2))  # (B, G, Hf, N, d)
        return kept, frozen.transpose(2, 3).reshape(B_, N, (H - hk) * d)

    def _eam_proj(self, kept: Optional[torch.Tensor], frozen: torch.Tensor) -> torch.Tensor:
        """``proj`` of the two head groups without reassembling them: each multiplies its own columns."""
        p = self.proj
        wf = self._eam_cached("proj.frozen", lambda: p.weight.index_select(1, self.eam_plan_cols_f), p.weight)
        if kept is None:
            return F.linear(frozen, wf, p.bias)
        wk = self._eam_cached("proj.kept", lambda: p.weight.index_select(1, self.eam_plan_cols_k), p.weight)
        out = F.linear(kept, wk, p.bias)
        flat, xf = out.view(-1, out.shape[-1]), frozen.reshape(-1, frozen.shape[-1])
        if not may_overwrite():
            return torch.addmm(flat, xf, wf.t()).view(out.shape)
        torch.addmm(flat, xf, wf.t(), out=flat)  # in place, in the form op counters see
        return out

    def _eam_in_head_order(self, kept: Optional[torch.Tensor], frozen: torch.Tensor) -> torch.Tensor:
        """The two head groups back in timm's head order, ``(B_, N, A)`` (for a scale norm or gate)."""
        x = torch.cat([frozen] if kept is None else [kept, frozen], dim=-1)
        return x.unflatten(-1, (self.num_heads, -1)).index_select(2, self.eam_plan_order).flatten(2)

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


# How much of the attention map simulated entry freezing computes at once on one CPU thread: one core's L2.
_MAP_CHUNK_BYTES = 1 << 20


class EamAttention(_EamMixin, Attention):
    """timm ``Attention`` with an explicit, hookable attention map when one is needed."""

    eam_reads_qk = True

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if not self.eam_active:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        if self.eam_executes_plan and attn_mask is None and not is_causal:
            if self.eam.plan == "row":
                return self._eam_out(self._eam_rows(x), gate)
            kept, frozen = self._eam_heads(x, None)
            if gate is None and isinstance(self.norm, nn.Identity):
                return self.proj_drop(self._eam_proj(kept, frozen))
            return self._eam_out(self._eam_in_head_order(kept, frozen), gate)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        state = self.eam
        if state.observer_k is not None:
            state.observer_k(k, None)
        if state.observer_qk is not None:
            state.observer_qk(q, k)
        bias = state.score_bias
        if (self.fused_attn and state.observer is None and state.observer_q is None and self.eam_quant is None
                and self.eam_frozen_mask is None and attn_mask is None and not is_causal):
            # Only keys read or a bias added (token merging): the fused kernel takes the bias as its mask.
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
            return self._eam_out(x.transpose(1, 2).reshape(B, N, self.attn_dim), gate)
        if (bias is None and attn_mask is None and not is_causal and self.eam_quant is None and not self.training
                and state.observer is None and state.observer_q is None and may_overwrite()):
            return self._eam_out(self._eam_frozen_entries(q, k, v), gate)
        attn = self._eam_scores(q, k)
        if bias is not None:
            attn = attn + bias
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        # The scores are a fresh tensor: the softmax may overwrite them (same numbers) where may_overwrite().
        attn = torch.softmax(attn, -1, out=attn) if may_overwrite() else attn.softmax(dim=-1)
        attn = self.attn_drop(self._eam_post_softmax(attn, 1, None))
        x = attn @ (v if self.eam_quant is None else self.eam_quant.v(v))
        return self._eam_out(x.transpose(1, 2).reshape(B, N, self.attn_dim), gate)

    def _eam_frozen_entries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Simulated frozen entries where nothing else reads the map, ``(B, N, A)``, in place; a few images at a
        time on one CPU thread, else the whole batch (docs/architecture-modules.md). Each image's numbers are
        those of the whole-batch path."""
        B, H, N, d = q.shape
        one_thread = q.device.type == "cpu" and torch.get_num_threads() == 1
        step = max(1, _MAP_CHUNK_BYTES // (H * N * k.shape[-2] * q.element_size())) if one_thread else B
        out = v.new_empty(B, N, H, d)
        for i in range(0, B, step):
            attn = self._eam_scores(q[i:i + step], k[i:i + step])
            attn = self.attn_drop(self._eam_post_softmax(torch.softmax(attn, -1, out=attn), 1, None))
            out[i:i + step] = (attn @ v[i:i + step]).transpose(1, 2)
        return out.view(B, N, H * d)

    def _eam_out(self, x: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.norm(x)
        return self.proj_drop(self.proj(x if gate is None else x * gate))

    def _eam_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Executed row freezing: only the kept query rows get a query, scores and a softmax."""
        B, N, _ = x.shape
        H, d, A = self.num_heads, self.head_dim, self.attn_dim
        keep, frozen = self.eam_plan_keep, self.eam_plan_frozen
        w, b = self.qkv.weight, self.qkv.bias
        # Slices of the fused weight are views: no weight is copied.
        kv = F.linear(x, w[A:], b[A:] if b is not None else None)
        k, v = kv.view(B, N, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        # Each group of rows is written once into its tokens' places (a concatenation then a gather back to
        # token order would copy every row twice more).
        out = v.new_empty(B, N, H, d)
        if keep.numel():
            q = F.linear(x.index_select(1, keep), w[:A], b[:A] if b is not None else None)
            q = q.view(B, keep.numel(), H, d).transpose(1, 2)
            out[:, keep] = self._eam_kept_attention(q, k, v, None).transpose(1, 2)  # (B, R, H, d)
        out[:, frozen] = frozen_times_v(self.eam_plan_values, v)[:, 0].transpose(1, 2)  # A^μ[h, rows]·V_h
        return out.view(B, N, A)


class EamWindowAttention(_EamMixin, WindowAttention):
    """Swin v1 ``WindowAttention``; ``eam.num_windows`` is set from the owning block."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.eam_active:
            return super().forward(x, mask=mask)
        B_, N, C = x.shape
        num_win = self._eam_groups(B_, mask)
        if self.eam_executes_plan:  # only "head" plans exist for Swin (set_frozen refuses rows)
            kept, frozen = self._eam_heads(x, self._eam_window_bias(B_, N, mask))
            return self.proj_drop(self._eam_proj(kept, frozen))
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self._eam_scores(q, k) + self._get_rel_pos_bias()
        if mask is not None:
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self._eam_post_softmax(self.softmax(attn), num_win, mask))
        x = attn @ (v if self.eam_quant is None else self.eam_quant.v(v))
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))

    def _eam_window_bias(self, B_: int, N: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Relative-position bias plus the shifted-window mask, ``(B_ or 1, H, N, N)`` (timm's fused form)."""
        bias = self._get_rel_pos_bias()
        if mask is None:
            return bias
        num_win = mask.shape[0]
        mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, self.num_heads, -1, -1)
        return bias + mask.reshape(-1, self.num_heads, N, N)


def bind_windows(eam_class: type, model: nn.Module) -> None:
    """The windows per image of each Swin block's attention of ``eam_class`` (v1, v2), each its own variable."""
    for block in model.modules():
        attn = getattr(block, "attn", None)
        if type(attn) is eam_class and hasattr(block, "input_resolution"):
            (h, w), (wh, ww) = block.input_resolution, block.window_size
            attn.eam.num_windows = math.ceil(h / wh) * math.ceil(w / ww)


def _vit_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """``patch_embed.img_size``; NaFlexViT's ``default_img_size``, which is None where it takes any size."""
    embeds = getattr(model, "embeds", None)
    if isinstance(embeds, NaFlexEmbeds):
        img = embeds.default_img_size
        return (int(img[0]), int(img[1])) if img is not None else None
    return patch_embed_size(model)


def _vit_opset(model: nn.Module, size: tuple[int, int]) -> tuple[int, str]:
    """NaFlexViT's antialiased resize of its position grid to another image's: ONNX ``Resize`` from opset 18."""
    embeds = getattr(model, "embeds", None)
    pos = getattr(embeds, "pos_embed", None)
    if (not isinstance(embeds, NaFlexEmbeds) or pos is None or not embeds.pos_embed_antialias
            or tuple(embeds.dynamic_feat_size(size)) == tuple(pos.shape[1:3])):
        return 0, ""
    return 18, (f"NaFlexViT resamples its {pos.shape[1]}x{pos.shape[2]} position grid to the "
                f"{size[0]}x{size[1]} image's with an antialiased resize, ONNX Resize from opset 18")


ADAPTERS: tuple[Adapter, ...] = (
    Adapter(family="ViT", timm_class=Attention, eam_class=EamAttention, verbs=BASE_VERBS | {"row"}, heads="sliced",
            cost_modelled=True, input_size=_vit_size, min_opset=_vit_opset,
            # A gated attention also feeds norm1's output to its gate: the reparameterisation would change it.
            quant=QuantFacts(inputs=lambda a: [a.qkv] if getattr(a, "gate", None) is None else [None],
                             groups={Block: vit_block}, score_order="config", k_dim=-2),
            tokens=TokenFamily("ViT", Block, PruneBlock, MergeBlock)),
    Adapter(family="Swin v1", timm_class=WindowAttention, eam_class=EamWindowAttention, verbs=BASE_VERBS,
            heads="sliced", cost_modelled=True,
            quant=QuantFacts(groups={SwinTransformerBlock: vit_block, PatchMerging: patch_merging},
                             score_order="scale_first", k_dim=-2),
            bind=partial(bind_windows, EamWindowAttention),
            # The one wording of these refusals; the CLI checks them before reading any data.
            why_not={"row": "row granularity does not apply to Swin: a row there is one (window, token) pair, "
                            "so windows would keep different numbers of rows; use entry or head",
                     "prune": "token pruning does not apply to Swin: its windowed attention needs the full "
                              "token grid; prune a ViT/DeiT, or freeze heads (--granularity head)",
                     "merge": "token merging does not apply to Swin: its windowed attention needs the full "
                              "token grid; merge tokens of a ViT/DeiT, or freeze heads (--granularity head)"}),
)

FAMILIES: tuple[Family, ...] = (
    Family("ViT / DeiT / DeiT III / DINOv2 / CLIP / NaFlexViT", (Attention,), "deit_tiny_patch16_224",
           "verbs also check the model: pruning and merging need a VisionTransformer's plain blocks"),
    Family("Swin v1", (WindowAttention,), "swin_tiny_patch4_window7_224",
           "rows: a row is one (window, token) pair; pruning, merging: windows need the full token grid"),
)
