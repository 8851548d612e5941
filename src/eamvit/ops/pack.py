"""Dense bit packing of unsigned integer codes, ``bits`` per code, no padding between codes.

The stream is little-endian at both levels: code ``i`` occupies stream bits ``[i·b, (i+1)·b)``, least
significant bit first, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8`` (at 4 bits, byte ``k``
holds code ``2k`` in its low nibble). The last byte is zero-padded.
"""
from __future__ import annotations

import torch

from eamvit.errors import EamError


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise EamError(f"packed codes need 1..8 bits per code, got {bits!r}")


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take: ``ceil(count·bits / 8)``."""
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer(-valued) ``codes`` in ``[0, 2^bits)`` (any shape, read flat) into a 1-D ``uint8``
    tensor, ``bits`` 1..8."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise EamError(f"codes must lie in [0, {(1 << bits) - 1}] to be packed at {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
    weights = (1 << torch.arange(8, dtype=torch.int64, device=flat.device))
    return (stream.reshape(-1, 8).to(torch.int64) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` codes :func:`pack_bits` wrote, as a 1-D ``uint8`` tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(count, bits):
        raise EamError(f"packed codes must be {packed_size(count, bits)} bytes (uint8) for {count} codes "
                       f"of {bits} bits, got {packed.numel()} ({packed.dtype})")
    if bits == 8:
        return packed.clone()
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device)
    stream = ((packed.to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)[: count * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int64, device=packed.device))
    return (stream.reshape(count, bits) * weights).sum(1).to(torch.uint8)
