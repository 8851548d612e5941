"""The export forms of quantized modules and of pruning and merging blocks, swapped in on a copy before
``torch.onnx`` traces it. See docs/architecture-modules.md."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

from eamvit.errors import EamError
from eamvit.modules.attention import EamAttention, attention_layers
from eamvit.modules.merge_block import MergeState
from eamvit.modules.prune_block import PruneState
from eamvit.modules.quant_layers import QuantConv2d, QuantLinear
from eamvit.modules.quantizers import UniformQuantizer
from eamvit.ops.qdq import (dequantize_linear, dequantize_per_channel, matmul_nbits, pack_nbits_weight,
                            quantize_dequantize, quantize_linear)

ExportConfig = Any  # methods.export.ExportConfig, read by field


def quant_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def activation_quantizers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(owner, attribute)`` of every activation quantizer: linear/conv inputs, ``q``, ``k``, ``v``, ``attn``."""
    out = [(m, "input_quantizer") for m in quant_modules(model)]
    for layer in attention_layers(model):
        qz = getattr(layer, "eam_quant", None)
        if qz is not None:
            out += [(qz, n) for n in ("q", "k", "v", "attn")]
    return out


class QdqActivation(UniformQuantizer):
    """Export class of an enabled activation quantizer: ``QuantizeLinear → DequantizeLinear``."""

    onnx_scale: torch.Tensor
    onnx_zero_point: torch.Tensor

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.onnx_scale, self.onnx_zero_point)


class QdqLinear(QuantLinear):
    """Export class of :class:`QuantLinear`: int8 weight codes, ``DequantizeLinear`` per output channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.on_dequantized(self.input_quantizer(x))

    def on_dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on an input its quantizer has already quantized and dequantized elsewhere in the graph."""
        w = dequantize_per_channel(self.onnx_codes, self.onnx_scale, self.onnx_zero_point)
        return F.linear(x, w, self.bias)


class QdqConv2d(QuantConv2d):
    """Export class of :class:`QuantConv2d` (the patch embedding), as :class:`QdqLinear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_per_channel(self.onnx_codes, self.onnx_scale, self.onnx_zero_point)
        return self._conv_forward(self.input_quantizer(x), w, self.bias)


class NBitsLinear(QuantLinear):
    """Export class of :class:`QuantLinear` for ``"weight-only"``: ``MatMulNBits`` plus the bias."""

    nbits: tuple[int, int, int, int]  # k, n, bits, block size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul_nbits(x, self.onnx_packed, self.onnx_scales, self.onnx_zero_points, *self.nbits)
        return y if self.bias is None else y + self.bias


class DequantizedConv2d(QuantConv2d):
    """Export class of :class:`QuantConv2d` for ``"weight-only"``: the dequantized weight in float."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.onnx_weight, self.bias)


class QdqAttention(EamAttention):
    """Export class of a quantized ViT attention in the ``"openvino"`` form: each quantization where the value is
    made, each dequantization where it is read (the numbers of :class:`EamAttention`'s quantized path)."""

    eam_reads_qk = False  # its quantized scores are not softmax(q·scale·kᵀ) of float q and k
    onnx_qkv_scale: torch.Tensor  # (3·A,): q's step on q's channels, then k's, then v's
    onnx_qkv_zero_point: torch.Tensor
    onnx_merge_codes: bool  # the projection's input is quantized before the head merge

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qz = self.eam_quant
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        # No token merging here: export refuses it for this form (methods.merge.OPENVINO_REPQ_MERGE).
        codes = quantize_linear(self.qkv(x), self.onnx_qkv_scale, self.onnx_qkv_zero_point)
        cq, ck, cv = codes.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = (dequantize_linear(c, p.onnx_scale, p.onnx_zero_point)
                   for c, p in ((cq, qz.q), (ck, qz.k), (cv, qz.v)))
        attn = (q @ k.transpose(-2, -1)) * self.scale  # RepQ-ViT's ViT order (scale_first False)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self._eam_post_softmax(attn.softmax(dim=-1), 1, None)
        x = self.attn_drop(attn) @ v
        if not self.onnx_merge_codes:
            return self._eam_out(x.transpose(1, 2).reshape(B, N, self.attn_dim), gate)
        pq = self.proj.input_quantizer
        x = quantize_linear(x, pq.onnx_scale, pq.onnx_zero_point).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj.on_dequantized(dequantize_linear(x, pq.onnx_scale, pq.onnx_zero_point)))


def _setup_openvino_attention(layer: nn.Module) -> None:
    """Swap a ViT attention whose q, k and v are quantized into :class:`QdqAttention`; others keep their form."""
    qz = getattr(layer, "eam_quant", None)
    if type(layer) is not EamAttention or qz is None or qz.scale_first is not False \
            or not isinstance(layer.q_norm, nn.Identity) or not isinstance(layer.k_norm, nn.Identity) \
            or not all(type(getattr(qz, n)) is QdqActivation for n in ("q", "k", "v")):
        return
    for attr in ("scale", "zero_point"):  # q's on q's channels, then k's, then v's
        parts = [getattr(getattr(qz, n), f"onnx_{attr}").expand(layer.attn_dim) for n in ("q", "k", "v")]
        layer.register_buffer(f"onnx_qkv_{attr}", torch.cat(parts).contiguous())
    proj = layer.proj
    layer.onnx_merge_codes = (isinstance(layer.norm, nn.Identity) and layer.gate is None and type(proj) is QdqLinear
                              and type(proj.input_quantizer) is QdqActivation)
    layer.__class__ = QdqAttention


def _weight_codes(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, step, zero point)`` of ``m``'s quantized weight: codes in ``[0, 2^b)``, per output channel."""
    wq = m.weight_quantizer
    shape = (-1,) + (1,) * (m.weight.dim() - 1)
    delta, zp = wq.delta.reshape(-1), wq.zero_point.reshape(-1)
    codes = torch.round(m.weight.detach() / delta.reshape(shape)) + zp.reshape(shape)
    return torch.clamp(codes, 0, (1 << wq.bits) - 1), delta, zp


def _setup_qdq_weight(m: nn.Module, config: ExportConfig) -> None:
    codes, delta, zp = _weight_codes(m)
    shift = 1 << (m.weight_quantizer.bits - 1)  # int8 codes (the u8·s8 integer kernels), same values
    if int(zp.min()) - shift < -128 or int(zp.max()) - shift > 127:
        raise EamError("a weight row of one sign has a zero point outside int8; export it with --symmetric-weights")
    m.register_buffer("onnx_codes", (codes - shift).to(torch.int8))
    m.register_buffer("onnx_scale", delta.float().clone())
    m.register_buffer("onnx_zero_point", (zp - shift).to(torch.int8))


def _setup_nbits_linear(m: nn.Module, config: ExportConfig) -> None:
    codes, delta, zp = _weight_codes(m)
    bits, (n, k) = m.weight_quantizer.bits, m.weight.shape
    fits = [b for b in (16, 32, 64, 128) if k % b == 0]
    bs = config.block_size if config.block_size is not None else max(fits, default=16)
    packed = pack_nbits_weight(codes, delta, zp, bits, bs)
    for name, t in zip(("onnx_packed", "onnx_scales", "onnx_zero_points"), packed):
        m.register_buffer(name, t)
    m.nbits = (k, n, bits, bs)


def _setup_dequantized(m: nn.Module, config: ExportConfig) -> None:
    m.register_buffer("onnx_weight", m.weight_quantizer.fake_quant(m.weight.detach()).clone())


# (scheme, quantized class) -> (export class, set-up)
_EXPORT_SWAP = {
    ("qdq", QuantLinear): (QdqLinear, _setup_qdq_weight),
    ("qdq", QuantConv2d): (QdqConv2d, _setup_qdq_weight),
    ("weight-only", QuantLinear): (NBitsLinear, _setup_nbits_linear),
    ("weight-only", QuantConv2d): (DequantizedConv2d, _setup_dequantized),
}


def swap_for_export_(model: nn.Module, config: ExportConfig) -> None:
    """Swap a prepared model's classes (a copy; never the user's model) for their export forms."""
    for m in model.modules():
        if isinstance(getattr(m, "eam_tokens", None), (PruneState, MergeState)):
            m.eam_tokens.scores_from_qk = True
    for owner, attr in activation_quantizers(model):
        q = getattr(owner, attr)
        if q.enabled and type(q) is UniformQuantizer:
            q.__class__ = QdqActivation
            zp = int(q.zero_point)
            signed = config.symmetric_activations
            q.register_buffer("onnx_scale", q.delta.reshape(()).float().clone())
            q.register_buffer("onnx_zero_point", torch.tensor(zp - 128 if signed else zp,
                                                              dtype=torch.int8 if signed else torch.uint8))
    for m in quant_modules(model):
        cls, setup = _EXPORT_SWAP[(config.scheme, type(m))]
        setup(m, config)
        m.__class__ = cls
    if config.runtime == "openvino":
        for layer in attention_layers(model):
            _setup_openvino_attention(layer)
