"""One RepQ-ViT-quantized attention layer of a tapped family, computed by hand.

BEiT's attention (layer 0 of the tiny seeded BEiT of ``test_families.py``, W4/A4) recomputed with
plain torch operations from the layer's weights and its quantizers' steps and zero points, written
out here from RepQ-ViT's definitions, not through eamvit's quantizer code: uniform
``(clamp(round(x/Δ) + z, 0, 2^b − 1) − z)·Δ`` (weights per output row), log√2 post-softmax
``Δ·2^(−c/2)`` with ``c = max(round(−2·log2(x/Δ)), 0)`` and 0 for ``c ≥ 2^b``; q, k and v as the
operands of timm's two matmuls (q already scaled), the relative-position bias in float.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from eamvit.methods.quantize import quantize_
from eamvit.methods.repq import RepQConfig
from eamvit.modules.attention import attention_layers

from test_families import _pair

BITS = 4


def _uniform(x: torch.Tensor, q, rows: bool = False) -> torch.Tensor:
    d, z = q.delta, q.zero_point
    if rows:  # one step and zero point per output row of a weight
        d, z = d.reshape(-1, 1), z.reshape(-1, 1)
    c = torch.clamp(torch.round(x / d) + z, 0, 2 ** BITS - 1)
    return (c - z) * d


def _log_sqrt2(x: torch.Tensor, q) -> torch.Tensor:
    c = torch.round(-2 * torch.log2(x / q.delta))
    value = q.delta * 2 ** (-c.clamp_min(0) / 2)
    return torch.where(c >= 2 ** BITS, torch.zeros_like(value), value)


def _linear(x: torch.Tensor, lin) -> torch.Tensor:
    return F.linear(_uniform(x, lin.input_quantizer), _uniform(lin.weight, lin.weight_quantizer, rows=True), lin.bias)


def _by_hand(a, x: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    qz = a.eam_quant
    qkv = _linear(x, a.qkv) + torch.cat((a.q_bias, a.k_bias, a.v_bias))
    q, k, v = qkv.reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    table = a.relative_position_bias_table[a.relative_position_index.reshape(-1)]
    bias = table.reshape(N, N, a.num_heads).permute(2, 0, 1)
    scores = _uniform(q * a.scale, qz.q) @ _uniform(k.transpose(-2, -1), qz.k) + bias
    probs = _log_sqrt2(scores.softmax(-1), qz.attn)
    out = (probs @ _uniform(v, qz.v)).transpose(1, 2).reshape(B, N, C)
    return _linear(out, a.proj)


def test_quantized_beit_attention_equals_the_hand_computation():
    _, model, x = _pair("beit")
    with torch.no_grad():  # timm starts the bias tables at zero: give them values the check can see
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    calib = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    quantize_(model, RepQConfig(w_bits=BITS, a_bits=BITS, calib_size=4), calib, progress=False)
    layer = attention_layers(model)[0]
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(x)
    handle.remove()
    with torch.no_grad():
        want = _by_hand(layer, seen["x"])
    assert (seen["y"] - want).abs().max() <= 1e-5 * want.abs().max()
    # The quantizers matter at 4 bits: the same layer in full precision is far from it.
    for n in ("q", "k", "v", "attn"):
        getattr(layer.eam_quant, n).enabled = False
    for lin in (layer.qkv, layer.proj):
        lin.input_quantizer.enabled = lin.weight_quantizer.enabled = False
    with torch.no_grad():
        fp = layer(seen["x"])
    assert (fp - want).abs().max() > 0.05 * want.abs().max()
