"""Fake-quantization arithmetic: quantize then dequantize, in float, as the reference codes simulate it.

Every quantizer in eamvit (RepQ-ViT, ADFQ-ViT, PMQ, frozen EAM values) calls these functions;
``torch.round`` rounds half to even, as in the reference implementations.
"""
from __future__ import annotations

import torch


def uniform_fake_quant(x: torch.Tensor, delta: torch.Tensor | float, zero_point: torch.Tensor | float,
                       bits: int) -> torch.Tensor:
    """Asymmetric uniform: ``q = clamp(round(x/Δ) + zp, 0, 2^b - 1)``, returns ``(q - zp)·Δ``.

    ``delta`` and ``zero_point`` broadcast against ``x`` (per tensor, channel or token).
    """
    q = torch.clamp(torch.round(x / delta) + zero_point, 0, (1 << bits) - 1)
    return (q - zero_point) * delta


def _log_fake_quant(x: torch.Tensor, delta: torch.Tensor | float, bits: int, steps_per_octave: int) -> torch.Tensor:
    levels = 1 << bits
    ratio = (x / delta).clamp_min(torch.finfo(x.dtype).tiny)
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
