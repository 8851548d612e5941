"""ONNX forms, for ``torch.onnx`` (the TorchScript exporter), of operators it has none for or none that
traces: the pruning scores (``torch.special.entr``, ``torch.count_nonzero``), ``F.fold`` (VOLO) and the
antialiased bicubic resize (NaFlexViT). :func:`register_symbolics` registers them for one export.
"""
from __future__ import annotations

import torch
from torch.onnx import symbolic_helper as sh

INT64 = 7  # onnx.TensorProto.INT64, a fixed enum value (this module does not import onnx)


def _entr_symbolic(g, x):
    """``torch.special.entr`` as ``−x·log x`` where ``x > 0``, else 0 (torch gives −∞ for negative
    inputs, which the Shannon score, over probabilities, never sees)."""
    zero = g.op("Constant", value_t=torch.tensor(0.0))
    value = g.op("Neg", g.op("Mul", x, g.op("Log", x)))
    return g.op("Where", g.op("Greater", x, zero), value, zero)


def _count_nonzero_symbolic(g, x, dim):
    """``torch.count_nonzero(x, dim)`` (the Rényi α = 0 score) as ``ReduceSum(Cast(x ≠ 0))``, int64."""
    d = sh._get_const(dim, "i", "dim")
    nonzero = g.op("Not", g.op("Equal", x, g.op("Constant", value_t=torch.tensor(0.0))))
    axes = g.op("Constant", value_t=torch.tensor([d], dtype=torch.int64))
    return g.op("ReduceSum", g.op("Cast", nonzero, to_i=INT64), axes, keepdims_i=0)


def _col2im_symbolic(g, x, output_size, kernel_size, dilation, padding, stride):
    """``F.fold`` as ONNX ``Col2Im`` (opset 18). torch.onnx's own form reads the rank from the traced
    ``output_size``, which it cannot when that size was computed from the input (VOLO); the padding's
    length gives the rank."""
    return g.op("Col2Im", x, output_size, kernel_size, dilations_i=dilation, pads_i=list(padding) * 2,
                strides_i=stride)


def _bicubic_aa_symbolic(g, x, output_size, align_corners, scales):
    """Antialiased bicubic resize (NaFlexViT resamples its position grid to the image's) as ONNX
    ``Resize`` with ``antialias`` (opset 18); torch's antialiased kernel is the ``a = −0.5`` cubic.
    The traced size may be computed from the input's shape: it is kept as a graph value."""
    size = sh._maybe_get_const(output_size, "is")
    if sh._is_value(size):
        parts = [sh._unsqueeze_helper(g, v, [0]) for v in sh._unpack_list(size)] if sh._is_packed_list(size) \
            else [size]
        size = g.op("Cast", g.op("Concat", *parts, axis_i=0), to_i=INT64)
    else:
        size = g.op("Constant", value_t=torch.tensor(list(size), dtype=torch.int64))
    lead = g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([0])),
                g.op("Constant", value_t=torch.tensor([2])))
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op("Resize", x, empty, empty, g.op("Concat", lead, size, axis_i=0), mode_s="cubic", antialias_i=1,
                cubic_coeff_a_f=-0.5, exclude_outside_i=1,
                coordinate_transformation_mode_s="align_corners" if align_corners else "half_pixel")


def register_symbolics(opset: int) -> None:
    """Register this module's forms with ``torch.onnx`` for an export at ``opset``."""
    torch.onnx.register_custom_op_symbolic("aten::special_entr", _entr_symbolic, opset)
    torch.onnx.register_custom_op_symbolic("aten::count_nonzero", _count_nonzero_symbolic, opset)
    if opset >= 18:
        col2im = sh.parse_args("v", "v", "v", "is", "is", "is")(_col2im_symbolic)
        torch.onnx.register_custom_op_symbolic("aten::col2im", col2im, opset)
        bicubic = sh.parse_args("v", "v", "i", "none")(_bicubic_aa_symbolic)
        torch.onnx.register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", bicubic, opset)
