"""Fake-quantization arithmetic: quantize then dequantize, in float, as the reference codes simulate it.

Every quantizer in eamvit (RepQ-ViT, ADFQ-ViT, PMQ, frozen EAM values) calls these functions;
``torch.round`` rounds half to even, as in the reference implementations.
"""
from __future__ import annotations

import torch


def uniform_fake_quant(x: torch.Tensor, delta: torch.Tensor | float, zero_point: torch.Tensor | float,
                       bits: int) -> torch.Tensor:
    """Asymmetric uniform ``(q - zp)·Δ``, ``q = clamp(round(x/Δ) + zp, 0, 2^b - 1)``; ``delta`` and
    ``zero_point`` broadcast (per tensor, channel or token)."""
    q = x / delta
    if _in_place_ok(q, x, delta, zero_point):
        # Same operations in the same order, without a temporary per step (calibration speed).
        return q.round_().add_(zero_point).clamp_(0, (1 << bits) - 1).sub_(zero_point).mul_(delta)
    q = torch.clamp(torch.round(q) + zero_point, 0, (1 << bits) - 1)
    return (q - zero_point) * delta


def _in_place_ok(q: torch.Tensor, *operands: torch.Tensor | float) -> bool:
    """In-place steps on ``q`` are safe when nothing needs a gradient and no operand widens its shape."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in operands):
        return False
    shapes = [t.shape for t in operands if isinstance(t, torch.Tensor)]
    return torch.broadcast_shapes(q.shape, *shapes) == q.shape


def _log_fake_quant(x: torch.Tensor, delta: torch.Tensor | float, bits: int, steps_per_octave: int) -> torch.Tensor:
    levels = 1 << bits
    # log2(0) = -inf gives code +inf, so 0 (and negatives) dequantize to exactly 0 at every bit width;
    # clamping to the smallest normal instead would give code 252 < 2^8 at 8 bits.
    ratio = x / delta
    if _in_place_ok(ratio, x, delta):
        q = ratio.clamp_min_(0.0).log2_().mul_(-steps_per_octave).round_()
        dead = q >= levels
        exponent = q.clamp_min_(0).div_(-steps_per_octave)
        return torch.pow(2.0, exponent, out=exponent).mul_(delta).masked_fill_(dead, 0.0)
    ratio = ratio.clamp_min(0.0)
    q = torch.round(-steps_per_octave * torch.log2(ratio))
    # Codes past the last level (and 0 itself) dequantize to 0, as in RepQ-ViT's log√2 quantizer.
    out = delta * torch.pow(2.0, -q.clamp_min(0) / steps_per_octave)
    return torch.where(q >= levels, torch.zeros_like(out), out)


def log2_fake_quant(x: torch.Tensor, delta: torch.Tensor | float, bits: int) -> torch.Tensor:
    """``q = clamp(round(-log2(x/Δ)), 0, 2^b - 1)``, value ``Δ·2^-q``; codes ``≥ 2^b`` map to 0."""
    return _log_fake_quant(x, delta, bits, 1)


def logsqrt2_fake_quant(x: torch.Tensor, delta: torch.Tensor | float, bits: int) -> torch.Tensor:
    """``q = clamp(round(-2·log2(x/Δ)), 0, 2^b - 1)``, value ``Δ·2^(-q/2)``; codes ``≥ 2^b`` map to 0."""
    return _log_fake_quant(x, delta, bits, 2)


def uniform_codes(x: torch.Tensor, delta: torch.Tensor | float, zero_point: torch.Tensor | float,
                  bits: int) -> torch.Tensor:
    """The integer codes ``clamp(round(x/Δ) + zp, 0, 2^b - 1)`` of :func:`uniform_fake_quant`, as ``uint8``."""
    return torch.clamp(torch.round(x / delta) + zero_point, 0, (1 << bits) - 1).to(torch.uint8)


def uniform_dequant(codes: torch.Tensor, delta: torch.Tensor | float,
                    zero_point: torch.Tensor | float) -> torch.Tensor:
    """``(q - zp)·Δ`` in float32: the value :func:`uniform_fake_quant` gives for code ``q``.

    With an integer zero point, ``uniform_fake_quant`` of this value gives it back bit for bit
    (``round`` recovers ``q - zp`` exactly), so codes are a lossless store of fake-quantized weights.
    """
    return (codes.to(torch.float32) - zero_point) * delta
