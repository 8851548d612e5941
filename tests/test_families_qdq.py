"""int8 QDQ export of every family RepQ-ViT quantizes, run by ONNX Runtime.

Each family's tiny seeded config (the table of ``test_families.py``, plus the ViT-class families and
Swin v1) is quantized W8/A8 with RepQ-ViT, exported, and run by ONNX Runtime; the reference is the
PyTorch model prepared for export (:func:`prepare_export_`, integer zero points and the uniform
post-softmax quantizer the graph carries).

Tolerance. These random-weight models are chaotic under a single code flip: moving the input by
1e-5 moves the simulation's own logits by up to 11 % of their range (measured on cait, crossvit,
hiera, twins, beit), because a value on a rounding boundary takes the other code and the wide random
weights amplify it. ONNX Runtime's float kernels (sgemm, LayerNorm, GELU, division by the scale)
round in another order than PyTorch's, so such flips happen and differ from CPU to CPU; the worst
seen while writing this was 6.6 % of the logit range (twins). The bound is 15 % of each image's
logit range, and the top-1 must agree on every image whose top-2 margin is wider than twice that
bound (an error within the bound cannot reorder those).
The graph as written (``optimize=False``: QuantizeLinear, DequantizeLinear, float MatMul) and the
fused integer kernels are held to it on every CPU: without VNNI, where ONNX Runtime's uint8 × int8
kernels saturate pairs of products in 16 bits, the export stores uint8 weights, which its u8·u8
kernels multiply exactly.
"""
from __future__ import annotations

import copy

import onnx
import pytest
import timm
from timm.models import cait, volo
import torch

import eamvit
from eamvit.errors import EamError
from eamvit.methods.export import ExportConfig, export_onnx, prepare_export_
from eamvit.methods.export_runtime import onnx_session, optimized_ops
from eamvit.methods.quantize import quantize_
from eamvit.methods.repq import RepQConfig
from eamvit.modules import family_quant
from eamvit.modules.attention import attention_layers
from eamvit.modules.quant_layers import QuantLinear

from test_families import FAMILIES, _pair
from test_families_quant import BATCHNORM

_T = dict(num_classes=5)
_V = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, **_T)
# The families that share ViT's Attention class, and Swin v1 (rows as test_families.FAMILIES).
VIT_CLASS = {
    "deit": (lambda: timm.create_model("deit_tiny_patch16_224", **_V), 32, {"Attention"}),
    "deit3": (lambda: timm.create_model("deit3_base_patch16_224", **_V), 32, {"Attention"}),
    "dinov2": (lambda: timm.create_model("vit_base_patch14_reg4_dinov2", **_V), 32, {"Attention"}),
    "clip": (lambda: timm.create_model("vit_base_patch16_clip_224", **_V), 32, {"Attention"}),
    # Its position grid at the image's (else an antialiased resize: test_naflexvit_at_another_grid...).
    "naflexvit": (lambda: timm.create_model("naflexvit_base_patch16_gap", pos_embed_grid_size=(4, 4), **_V), 32,
                  {"Attention"}),
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
                                       embed_dim=16, depths=(2, 2), num_heads=(2, 2), **_T), 32, {"WindowAttention"}),
}
TABLE = {**{f: row for f, row in FAMILIES.items() if f not in BATCHNORM}, **VIT_CLASS}
BOUND = 0.15  # of each image's logit range; see the module doc
# Operators that only move or select values: a DequantizeLinear seen through them still feeds the MatMul.
_LAYOUT = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split", "Flatten", "Identity",
           "Expand"}


def _dequantized(graph: onnx.GraphProto, name: str, producer: dict) -> bool:
    """Whether tensor ``name`` is a DequantizeLinear output, seen through layout operators."""
    node = producer.get(name)
    while node is not None and node.op_type in _LAYOUT:
        node = producer.get(node.input[0])
    return node is not None and node.op_type == "DequantizeLinear"


def _matmuls(graph: onnx.GraphProto) -> tuple[int, int]:
    """``(MatMuls/Gemms whose two operands are dequantized, the others)``."""
    producer = {o: n for n in graph.node for o in n.output}
    qdq = sum(all(_dequantized(graph, i, producer) for i in n.input[:2])
              for n in graph.node if n.op_type in ("MatMul", "Gemm"))
    return qdq, sum(n.op_type in ("MatMul", "Gemm") for n in graph.node) - qdq


def _check_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    span = want.amax(1) - want.amin(1)
    err = (got - want).abs().amax(1) / span
    assert bool((err <= BOUND).all()), (what, err)
    top2 = want.topk(2, 1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BOUND * span
    assert bool((got.argmax(1) == want.argmax(1))[clear].all()), (what, err, clear)


@pytest.mark.parametrize("family", sorted(TABLE))
def test_int8_qdq_export_agrees_with_the_prepared_model(family, tmp_path):
    _, model, x = _pair(family, TABLE)
    size = TABLE[family][1]
    calib = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    quantize_(model, RepQConfig(w_bits=8, a_bits=8, calib_size=4), calib, progress=False)
    config = ExportConfig()  # VOLO: opset 18 picked for its outlook attention (test_families_export.py)
    sim = prepare_export_(copy.deepcopy(model), config)
    path = tmp_path / "q.onnx"
    export_onnx(model, path, config, input_size=(3, size, size))
    images = torch.cat([x, calib, x.flip(-1)])  # 8: the graph was traced at batch 2
    with torch.no_grad():
        want = sim(images)
    exact = onnx_session(path, threads=1, optimize=False).run(None, {"images": images.numpy()})[0]
    _check_close(torch.from_numpy(exact), want, "graph as written")
    fused = torch.from_numpy(onnx_session(path, threads=1).run(None, {"images": images.numpy()})[0])
    assert fused.shape == want.shape and bool(fused.isfinite().all())
    _check_close(fused, want, "fused int8 kernels")

    # Every quantized Linear and both matmuls of every attention read QuantizeLinear → DequantizeLinear
    # operands (weights: DequantizeLinear of 8-bit codes); what stays in float is RepQ-ViT's choice.
    graph = onnx.load(str(path)).graph
    linears = sum(isinstance(m, QuantLinear) for m in model.modules())
    layers = attention_layers(model)
    # CaiT's talking heads mix the quantized map across heads in float before it meets v; VOLO's
    # outlook attention (no q·k map) applies its float weights to v.
    mixed = sum(isinstance(m, cait.TalkingHeadAttn) for m in model.modules())
    outlook = sum(isinstance(m, volo.OutlookAttention) for m in model.modules())
    qdq, other = _matmuls(graph)
    assert qdq == linears + 2 * len(layers) - mixed, (qdq, linears, len(layers))
    assert other == len(family_quant.float_linears(model)) + mixed + outlook, other
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    dq_inputs = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert all(i in inits or producer[i].op_type == "QuantizeLinear" for i in dq_inputs)
    ops = optimized_ops(path, threads=1)  # ONNX Runtime turned the QDQ pairs into integer kernels
    assert ops.get("MatMulIntegerToFloat", 0) + ops.get("QLinearMatMul", 0) > 0, ops


def test_naflexvit_at_another_grid_exports_from_opset_18(tmp_path):
    """At an image size other than its position grid's, NaFlexViT resamples the grid with an antialiased
    bicubic: ONNX Resize with antialias, from opset 18, which the export picks; opset 17 given is refused
    in one line."""
    torch.manual_seed(0)
    model = eamvit.create_model("naflexvit_base_patch16_gap", model_kwargs=dict(_V))  # 16×16 grid, 4×4 image grid
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(EamError) as err:
        export_onnx(model, tmp_path / "a.onnx", ExportConfig(opset=17), input_size=(3, 32, 32))
    assert "\n" not in str(err.value) and "--opset 18" in str(err.value)
    assert not (tmp_path / "a.onnx").exists()
    export_onnx(model, tmp_path / "b.onnx", input_size=(3, 32, 32))
    assert {o.domain: o.version for o in onnx.load(str(tmp_path / "b.onnx")).opset_import}[""] == 18
    with torch.no_grad():
        want = model(x)
    got = torch.from_numpy(onnx_session(tmp_path / "b.onnx", threads=1).run(None, {"images": x.numpy()})[0])
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert "Resize" in {n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node}
