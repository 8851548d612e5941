"""ADFQ-ViT's quantizer modules (Jiang et al., 2024) on the shared quantizer family; the training that
uses them is :mod:`eamvit.methods.adfq`."""
from __future__ import annotations

from typing import Any, Literal, Sequence, get_args

import torch

from eamvit.errors import EamError
from eamvit.modules.quantizers import (DEFAULT_PERCENTILES, Log2Quantizer, LogSqrt2Quantizer, Quantizer,
                                       UniformQuantizer, one_of)
from eamvit.ops.quant import uniform_fake_quant

LogKind = Literal["logsqrt2", "log2"]
LOG_KINDS = get_args(LogKind)
OutlierMode = Literal["abs", "upper"]
OUTLIER_MODES = get_args(OutlierMode)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _with_grad(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` (the exact fake-quant arithmetic) carrying the gradients of ``surrogate``."""
    return value + (surrogate - surrogate.detach())


def _learning(*ts: Any) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


class LearnableUniformQuantizer(UniformQuantizer):
    """:class:`UniformQuantizer` whose Δ can be learned: the values of :func:`~eamvit.ops.quant.uniform_fake_quant`,
    the gradients of the same formula with straight-through rounding (LSQ-style)."""

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        d, zp = self._view(self.delta, x), self._view(self.zero_point, x)
        if not _learning(d, x):
            return uniform_fake_quant(x, d, zp, self.bits)
        value = uniform_fake_quant(x.detach(), d.detach(), zp, self.bits)
        surrogate = (torch.clamp(round_ste(x / d) + zp, 0, (1 << self.bits) - 1) - zp) * d
        return _with_grad(value, surrogate)


class _LearnableLogMixin:
    """Learnable Δ for the log quantizers (post-softmax, SLQ inner quantizer)."""

    _steps_per_octave: int

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        d = self._view(self.delta, x)  # type: ignore[attr-defined]
        if not _learning(d, x):
            return self._fq(x, d)  # type: ignore[attr-defined]
        value = self._fq(x.detach(), d.detach())  # type: ignore[attr-defined]
        s, levels = self._steps_per_octave, 1 << self.bits  # type: ignore[attr-defined]
        q = round_ste(-s * torch.log2((x / d).clamp_min(1e-30)))
        surrogate = d * torch.pow(2.0, -q.clamp_min(0) / s)
        surrogate = torch.where(q.detach() >= levels, torch.zeros_like(surrogate), surrogate)
        return _with_grad(value, surrogate)


class LearnableLogSqrt2Quantizer(_LearnableLogMixin, LogSqrt2Quantizer):
    """:class:`LogSqrt2Quantizer` with a learnable Δ."""


class LearnableLog2Quantizer(_LearnableLogMixin, Log2Quantizer):
    """:class:`Log2Quantizer` with a learnable Δ."""


def log_quantizer(kind: str, bits: int, percentiles: Sequence[float]) -> Quantizer:
    cls = LearnableLogSqrt2Quantizer if kind == "logsqrt2" else LearnableLog2Quantizer
    return cls(bits, percentiles=percentiles)


class OutlierAwareQuantizer(LearnableUniformQuantizer):
    """ADFQ-ViT's Per-Patch Outlier-aware Quantizer: per-token uniform + full-precision outliers (counted for
    :func:`outlier_report`), an outlier being ``|x| > α`` (``mode="abs"``, the code) or ``x ≥ α`` (``"upper"``,
    paper eq. 18) for ``alpha`` > 0; ``search="minmax"`` is paper eq. 16–17, ``"mse"`` the family's search."""

    def __init__(self, bits: int, alpha: float, mode: str = "abs",
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES, search: str = "mse"):
        super().__init__(bits, "token", percentiles=percentiles, search=search)
        if not alpha > 0:
            raise EamError(f"outlier threshold alpha={alpha!r} must be > 0")
        self.alpha = float(alpha)
        self.mode = one_of(mode, OUTLIER_MODES, "outlier mode")
        self.outliers = self.seen = 0

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha}, mode={self.mode}"

    def outlier_mask(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() > self.alpha if self.mode == "abs" else x >= self.alpha

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dense, sparse)`` with ``dense + sparse == x`` exactly (one of the two is 0 at each entry)."""
        mask = self.outlier_mask(x)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(mask, zero, x), torch.where(mask, x, zero)

    @property
    def outlier_ratio(self) -> float:
        return self.outliers / self.seen if self.seen else float("nan")

    def reset_counts(self) -> None:
        self.outliers = self.seen = 0

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        super().calibrate(self.split(x)[0])

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.outlier_mask(x)
        self.outliers += int(mask.sum())
        self.seen += mask.numel()
        dense = torch.where(mask, torch.zeros((), dtype=x.dtype, device=x.device), x)
        return torch.where(mask, x, super().fake_quant(dense))


class ShiftLogQuantizer(Quantizer):
    """ADFQ-ViT's Shift-Log2 Quantizer: ``Q(x − min x + ε) + min x − ε`` with the log quantizer ``self.log``
    of ``kind`` ``"logsqrt2"`` (code) or ``"log2"`` (paper eq. 23); ``min x`` over the whole tensor, recomputed
    at every forward as the code does."""

    def __init__(self, bits: int, kind: str = "logsqrt2", eps: float = 1e-8,
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        super().__init__(bits, "tensor", percentiles=percentiles)
        self.kind = one_of(kind, LOG_KINDS, "shift-log quantizer")
        self.eps = float(eps)
        self.log = log_quantizer(kind, bits, percentiles)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity=tensor, kind={self.kind}, eps={self.eps}, enabled={self.enabled}"

    def _shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = x.detach().amin()
        return x - m + self.eps, m

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        self.log.calibrate(self._shift(x)[0])

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        shifted, m = self._shift(x)
        return self.log.fake_quant(shifted) + m - self.eps


def rectified_sigmoid(v: torch.Tensor, zeta: float = 1.1, gamma: float = -0.1) -> torch.Tensor:
    """AdaRound's ``h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)`` (ADFQ-ViT eq. 26)."""
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor, zeta: float = 1.1, gamma: float = -0.1) -> torch.Tensor:
    """``V`` with ``h(V) = h`` for ``0 < h < 1`` (AdaRound's initialisation from the fractional part)."""
    return -torch.log((zeta - gamma) / (h - gamma) - 1)


def round_loss(v: torch.Tensor, beta: float, zeta: float = 1.1, gamma: float = -0.1) -> torch.Tensor:
    """``Σ 1 − |2h(V) − 1|^β`` (ADFQ-ViT eq. 30)."""
    return (1 - (2 * rectified_sigmoid(v, zeta, gamma) - 1).abs().pow(beta)).sum()


def beta_schedule(step: int, total: int, start: float = 20.0, end: float = 2.0, warmup: float = 0.0) -> float:
    """β at ``step`` (0-based) of ``total``: ``start`` until ``warmup·total``, then linear to ``end`` (the
    reference's ``LinearTempDecay`` with its 1-based counter)."""
    t, t0 = step + 1, warmup * total
    if t < t0:
        return float(start)
    rel = (t - t0) / (total - t0)
    return float(end + (start - end) * max(0.0, 1.0 - rel))


class AdaRoundQuantizer(UniformQuantizer):
    """Per-output-channel weight quantizer with AdaRound's learned rounding ``V`` (``alpha``, initialised so that
    ``h(V)`` is the fractional part of W/Δ).

    ``mode``: ``"nearest"`` (round to nearest, before reconstruction), ``"soft"``
    (``clamp(⌊W/Δ⌋ + h(V) + zp, 0, 2^b − 1)``, differentiable in V) or ``"hard"`` (``h = [V ≥ 0]``,
    the final quantized weights, computed by :func:`~eamvit.ops.quant.uniform_fake_quant`).
    """

    _param_names = ("delta", "zero_point", "alpha")

    def __init__(self, bits: int, zeta: float = 1.1, gamma: float = -0.1,
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        super().__init__(bits, "channel", channel_dim=0, percentiles=percentiles)
        self.zeta, self.gamma = zeta, gamma
        self.mode = "nearest"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}"

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor) -> None:
        super().calibrate(w)
        d = self._view(self.delta, w)
        rest = w / d - torch.floor(w / d)
        self.alpha = inverse_rectified_sigmoid(rest, self.zeta, self.gamma).detach().clone()

    def rounded_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``(⌊W/Δ⌋ + [V ≥ 0])·Δ``: the weights on the grid that the ``"hard"`` mode quantizes; a plain
        :class:`UniformQuantizer` with the same Δ and zero point gives the ``"hard"`` output on them."""
        d = self._view(self.delta, w)
        return (torch.floor(w / d) + (self.alpha >= 0).to(w.dtype)) * d

    def soft_targets(self) -> torch.Tensor:
        return rectified_sigmoid(self.alpha, self.zeta, self.gamma)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        d, zp = self._view(self.delta, w), self._view(self.zero_point, w)
        if self.mode == "nearest":
            return uniform_fake_quant(w, d, zp, self.bits)
        floor = torch.floor(w / d)
        if self.mode == "soft":
            return (torch.clamp(floor + self.soft_targets() + zp, 0, (1 << self.bits) - 1) - zp) * d
        # On the grid already: the rounding inside uniform_fake_quant only absorbs float error.
        return uniform_fake_quant(self.rounded_weight(w), d, zp, self.bits)
