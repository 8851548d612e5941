"""Integer-inference operators with an ONNX form: each is a :class:`torch.autograd.Function` whose
``forward`` computes exactly what its ONNX node computes (so a traced model gives the export's numbers)
and whose ``symbolic`` names the node ``torch.onnx`` emits. See docs/architecture-core.md."""
from __future__ import annotations

import math

import torch
from torch.onnx.symbolic_helper import _get_tensor_rank

from eamvit.errors import EamError
from eamvit.ops.pack import pack_bits

_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _qrange(zero_point: torch.Tensor) -> tuple[int, int]:
    rng = _RANGE.get(zero_point.dtype)
    if rng is None:
        raise EamError(f"an ONNX zero point must be uint8 or int8, got {zero_point.dtype}")
    return rng


class _QDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        lo, hi = _qrange(zero_point)
        z = zero_point.to(x.dtype)
        return (torch.clamp(torch.round(x / scale) + z, lo, hi) - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """ONNX ``DequantizeLinear(QuantizeLinear(x))`` per tensor (0-d float32 ``scale``; the 0-d
    ``uint8``/``int8`` ``zero_point``'s dtype sets the code range)."""
    return _QDQ.apply(x, scale, zero_point)


class _Q(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        lo, hi = _qrange(zero_point)
        return torch.clamp(torch.round(x / scale) + zero_point.to(x.dtype), lo, hi).to(zero_point.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        if _get_tensor_rank(scale) == 0:
            return g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("QuantizeLinear", x, scale, zero_point, axis_i=_get_tensor_rank(x) - 1)


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """ONNX ``QuantizeLinear``: the codes ``sat(round(x/s) + z)`` in the zero point's type; ``scale``
    and ``zero_point`` are 0-d or one per channel of the last axis."""
    if scale.dim() not in (0, 1) or scale.shape != zero_point.shape:
        raise EamError("QuantizeLinear takes a per-tensor or a per-channel (last axis) scale and a zero point "
                       f"of the same shape, got {tuple(scale.shape)} and {tuple(zero_point.shape)}")
    return _Q.apply(x, scale, zero_point)


class _DQ(torch.autograd.Function):
    """Per tensor (0-d ``scale``) or per channel of axis 0."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (codes.dim() - 1)
        return (codes.to(scale.dtype) - zero_point.to(scale.dtype).reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point):
        if _get_tensor_rank(scale) == 0:
            return g.op("DequantizeLinear", codes, scale, zero_point)
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)


def dequantize_linear(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """ONNX ``DequantizeLinear`` per tensor: ``(c − z)·s`` in float32 (0-d ``scale`` and ``zero_point``)."""
    _qrange(zero_point)
    if codes.dtype != zero_point.dtype or scale.dim() != 0:
        raise EamError(f"DequantizeLinear per tensor needs codes ({codes.dtype}) and a 0-d zero point "
                       f"({zero_point.dtype}) of one type")
    return _DQ.apply(codes, scale, zero_point)


def dequantize_per_channel(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """ONNX ``DequantizeLinear(codes, scale, zero_point, axis=0)``: ``(c − z)·s`` per output channel."""
    _qrange(zero_point)
    if codes.dtype != zero_point.dtype:
        raise EamError(f"codes ({codes.dtype}) and zero points ({zero_point.dtype}) must share a type")
    return _DQ.apply(codes, scale, zero_point)


# --------------------------------------------------------------------------- MatMulNBits


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each row of integer ``codes`` ``(R, M)`` in ``[0, 2^bits)`` to ``(R, ceil(M·bits/8))`` uint8,
    least significant bits first; rows are zero-padded to whole bytes."""
    if bits not in (2, 4, 8):
        raise EamError(f"MatMulNBits packs 2, 4 or 8 bits per code, not {bits}")
    # Rows padded to whole bytes, then one dense stream: pack_bits's layout is this one.
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, (-codes.shape[1]) % (8 // bits)))
    return pack_bits(padded, bits).reshape(codes.shape[0], -1)


def unpack_rows(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of each row that :func:`pack_rows` packed, as ``(R, count)`` int32."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :count]


class _MatMulNBits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                k: int, n: int, bits: int, block_size: int) -> torch.Tensor:
        blocks = packed.shape[1]
        codes = unpack_rows(packed.reshape(n, -1), bits, blocks * block_size).reshape(n, blocks, block_size)
        zp = unpack_rows(zero_points.reshape(n, -1), bits, blocks)
        w = (codes.to(x.dtype) - zp.to(x.dtype)[..., None]) * scales.reshape(n, blocks, 1)
        return x @ w.reshape(n, -1)[:, :k].t()

    @staticmethod
    def symbolic(g, x, packed, scales, zero_points, k, n, bits, block_size):
        out = g.op("com.microsoft::MatMulNBits", x, packed, scales, zero_points,
                   K_i=k, N_i=n, bits_i=bits, block_size_i=block_size)
        sizes = x.type().varyingSizes()
        if sizes is not None:  # the exporter cannot infer a contrib op's output type: give it
            out.setType(x.type().with_sizes(list(sizes[:-1]) + [n]))
        return out


def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                 k: int, n: int, bits: int, block_size: int) -> torch.Tensor:
    """ONNX Runtime's ``MatMulNBits``: ``x @ Wᵀ`` with ``W`` ``(n, k)`` stored block-wise at ``bits`` bits
    (2, 4 or 8), as :func:`pack_nbits_weight` packs it."""
    return _MatMulNBits.apply(x, packed, scales, zero_points, k, n, bits, block_size)


def pack_nbits_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                      block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed, scales, zero_points)`` for :func:`matmul_nbits` from ``(n, k)`` codes and per-row steps
    and zero points, repeated over the row's blocks so that the block-wise operator computes exactly the
    per-channel weight; ``k`` is padded with the row's zero point (dequantizes to 0)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise EamError(f"MatMulNBits block size must be a power of two ≥ 16, got {block_size}")
    n, k = codes.shape
    top = (1 << bits) - 1
    zp = zero_point.reshape(-1).round().to(torch.int32)
    if int(codes.min()) < 0 or int(codes.max()) > top or int(zp.min()) < 0 or int(zp.max()) > top:
        raise EamError(f"{bits}-bit weight codes and zero points must lie in [0, {top}]")
    blocks = math.ceil(k / block_size)
    c = torch.cat([codes.to(torch.int32), zp[:, None].expand(n, blocks * block_size - k)], dim=1)
    packed = pack_rows(c, bits).reshape(n, blocks, block_size * bits // 8)
    scales = scale.reshape(-1, 1).to(torch.float32).expand(n, blocks).reshape(-1).contiguous()
    zps = pack_rows(zp[:, None].expand(n, blocks), bits).reshape(-1)
    return packed, scales, zps
