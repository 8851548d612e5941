"""Quantized layers (made by class swap in :func:`eamvit.methods.repq.prepare_`), the quantizers of an
instrumented attention (``eam_quant``), and PMQ's per-patch bit-width quantizer."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eamvit.errors import EamError
from eamvit.modules.quantizers import DEFAULT_PERCENTILES, Quantizer, UniformQuantizer, make_quantizer


class QuantLinear(nn.Linear):
    """``nn.Linear`` with an input and a weight quantizer (set by :func:`eamvit.methods.repq.prepare_`)."""

    input_quantizer: Quantizer
    weight_quantizer: Quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with an input and a weight quantizer (set by :func:`eamvit.methods.repq.prepare_`)."""

    input_quantizer: Quantizer
    weight_quantizer: Quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class AttentionQuantizers(nn.Module):
    """The ``eam_quant`` of an instrumented attention: ``q``, ``k``, ``v``, ``attn`` (``attn_quantizer``:
    ``"logsqrt2"``, ``"log2"`` or ``"uniform"``) and the score order ``scale_first``: ``(q·scale) @ kᵀ`` when
    True, ``(q @ kᵀ)·scale`` when False, None where q and k are the operands of timm's own score matmul (the
    families of :mod:`eamvit.modules.families`)."""

    def __init__(self, a_bits: int, attn_quantizer: str, scale_first: Optional[bool],
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        super().__init__()
        self.q, self.k, self.v = (UniformQuantizer(a_bits, percentiles=percentiles) for _ in range(3))
        self.attn = make_quantizer(attn_quantizer, a_bits, percentiles=percentiles)
        self.scale_first = scale_first

    def extra_repr(self) -> str:
        return f"scale_first={self.scale_first}"


class PatchBitsQuantizer(Quantizer):
    """Uniform per-tensor quantization with one bit width per token position (PMQ's AAS): ``token_bits`` ``(N,)``
    along the input's ``token_dim`` (``-2`` for ``(B, H, N, d)`` q / k / v); tokens sharing a bit width share
    one :class:`UniformQuantizer` (lazily calibrated on them)."""

    def __init__(self, token_bits: torch.Tensor, token_dim: int = -2,
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        token_bits = torch.as_tensor(token_bits, dtype=torch.long)
        super().__init__(int(token_bits.max()), "tensor", percentiles=percentiles)
        self.register_buffer("token_bits", token_bits.clone())
        self.token_dim = token_dim
        self.groups = nn.ModuleDict({str(b): UniformQuantizer(int(b), "tensor", percentiles=percentiles)
                                     for b in sorted(set(token_bits.tolist()))})

    def extra_repr(self) -> str:
        counts = {int(b): int((self.token_bits == int(b)).sum()) for b in self.groups}
        return f"bits={self.bits} (max), granularity=tensor per bit group, token_bits={counts}, enabled={self.enabled}"

    def _index(self, b: str, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.token_dim] != self.token_bits.numel():
            raise EamError(f"AAS allocated {self.token_bits.numel()} patches but the input has "
                           f"{x.shape[self.token_dim]}; run the model at its calibration image size")
        return (self.token_bits == int(b)).nonzero().flatten().to(x.device)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        for b, q in self.groups.items():
            q.calibrate(x.index_select(self.token_dim, self._index(b, x)))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dim = self.token_dim % x.dim()
        for b, q in self.groups.items():
            idx = self._index(b, x)
            out = out.index_copy(dim, idx, q.fake_quant(x.index_select(dim, idx)))
        return out
