"""Quantizer modules on top of :mod:`eamvit.ops.quant`: range search, granularity, lazy init.
See docs/architecture-modules.md."""
from __future__ import annotations

import math
import functools
from typing import Any, Collection, Optional, Sequence

import numpy as np
import torch
from torch import nn

from eamvit.errors import EamError
from eamvit.ops.quant import log2_fake_quant, logsqrt2_fake_quant, uniform_codes, uniform_fake_quant

GRANULARITIES = ("tensor", "channel", "token")
SEARCHES = ("mse", "minmax")
DEFAULT_PERCENTILES = (0.999, 0.9999, 0.99999)
MIN_BITS, MAX_BITS = 2, 8
# Older torch.quantile refuses inputs above 2^24 elements; the reference then uses numpy.percentile.
_TORCH_QUANTILE_LIMIT = 1 << 24
# Floor of a searched step: a constant channel has max == min, which the reference divides by (NaN).
DELTA_FLOOR = 1e-8


def one_of(value: Any, choices: Collection[str], what: str) -> Any:
    """``value``, refused in one line (``what`` names it) unless it is one of ``choices``."""
    if value not in choices:
        raise EamError(f"{what} {value!r} is not one of {', '.join(choices)}")
    return value


def check_quant_bits(bits: Any, what: str = "bits") -> int:
    """Validate a quantizer bit width (2..8, as RepQ-ViT supports); ``what`` names it in the error (``--w-bits``)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise EamError(f"{what}={bits!r} is out of range; quantization supports integer bit widths "
                       f"{MIN_BITS}..{MAX_BITS}")
    return bits


@functools.lru_cache(maxsize=None)
def torch_quantile_accepts_large() -> bool:
    """Whether the installed :func:`torch.quantile` takes more than 2^24 elements (probed once): then the reference
    ranks such inputs with torch (float32 rank), else with ``numpy.percentile`` (double rank)."""
    try:
        torch.quantile(torch.zeros(_TORCH_QUANTILE_LIMIT + 1), 0.5)
    except RuntimeError:
        return False
    return True


def _rank(p: float, n: int) -> tuple[int, int, float]:
    """``(below, above, weight)`` of quantile ``p`` over ``n`` sorted values, as the reference computes it."""
    if n <= _TORCH_QUANTILE_LIMIT or torch_quantile_accepts_large():
        r = float(np.float32(p)) * (n - 1)  # torch casts q to the input dtype, then ranks in double
        w = float(np.float32(r - math.floor(r)))
    else:
        r = p * (n - 1)
        w = r - math.floor(r)
    return int(math.floor(r)), int(math.ceil(r)), w


def row_quantiles(rows: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    """Linear-interpolation quantiles ``(len(probs), K)`` of each row of ``rows`` ``(K, M)``, equal to
    ``torch.quantile(rows, p, dim=1)`` (bit for bit up to 2^24 elements per row) but reading only the tails,
    one :func:`torch.topk` per side: fast for the extreme percentiles range searches use, and no size limit."""
    n = rows.shape[1]
    if n == 0:
        raise EamError("cannot calibrate a quantizer on an empty tensor")
    ranks = [_rank(p, n) for p in probs]
    res: list[Optional[torch.Tensor]] = [None] * len(probs)
    for upper in (True, False):
        which = [i for i, p in enumerate(probs) if (p >= 0.5) == upper]
        if not which:
            continue
        if upper:  # largest first: ascending index j sits at column n-1-j
            k = n - min(ranks[i][0] for i in which)
            col = lambda j: n - 1 - j  # noqa: E731
        else:
            k = max(ranks[i][1] for i in which) + 1
            col = lambda j: j  # noqa: E731
        tail = _tail(rows, k, upper)
        for i in which:
            lo, hi, w = ranks[i]
            weight = torch.tensor(w, dtype=rows.dtype, device=rows.device)
            res[i] = torch.lerp(tail[:, col(lo)], tail[:, col(hi)], weight)
    return torch.stack(res)


# Past this many elements, one row's tail is first narrowed down (see _tail).
_PREFILTER_MIN = 1 << 16
_SAMPLE_STEP = 61  # prime: a sample of (B, N, C) activations does not keep to a few channels


def _tail(rows: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """``rows.topk(k, dim=1, largest=largest, sorted=True).values``; one long row prefiltered (see the docs)."""
    n = rows.shape[1]
    if rows.shape[0] == 1 and n >= _PREFILTER_MIN and k * 16 <= n:
        sample = rows[:, ::_SAMPLE_STEP]
        want = min(sample.shape[1], 2 * k // _SAMPLE_STEP + 16)  # about twice k values past t, expected
        t = sample.topk(want, dim=1, largest=largest, sorted=True).values[:, -1:]
        left = rows[torch.lt(rows, t).logical_not_() if largest else torch.le(rows, t)]
        if left.numel() >= k:  # else an unlucky sample: the whole row
            rows = left.unsqueeze(0)
    return rows.topk(k, dim=1, largest=largest, sorted=True).values


def _norm_dim(dim: int, ndim: int) -> int:
    d = dim + ndim if dim < 0 else dim
    if not 0 <= d < ndim:
        raise EamError(f"channel dimension {dim} does not exist in a {ndim}-D tensor")
    return d


def to_rows(x: torch.Tensor, granularity: str, channel_dim: int = -1) -> torch.Tensor:
    """``x`` as ``(K, M)``: one row per quantization group (K = 1 for ``"tensor"``)."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":
        return x.movedim(_norm_dim(channel_dim, x.dim()), 0).reshape(x.shape[channel_dim], -1)
    if x.dim() < 3:
        raise EamError(f"per-token quantization needs a (B, tokens..., C) tensor, got shape {tuple(x.shape)}")
    kept = x.shape[1:-1]
    return x.movedim(0, -2).reshape(math.prod(kept), -1)


def param_shape(x: torch.Tensor, granularity: str, channel_dim: int = -1) -> tuple[int, ...]:
    """Shape of a parameter that broadcasts against ``x`` for this granularity."""
    if granularity == "tensor":
        return ()
    shape = [1] * x.dim()
    if granularity == "channel":
        d = _norm_dim(channel_dim, x.dim())
        shape[d] = x.shape[d]
    else:
        shape[1:-1] = x.shape[1:-1]
    return tuple(shape)


# Candidates are scored together as one (P, K, M) tensor up to this many elements (few large ops), then one at a time.
BATCHED_SEARCH_LIMIT = 1 << 26


def _candidate_mse(rows: torch.Tensor, fake_quant, *params: torch.Tensor) -> torch.Tensor:
    """``(P, K)`` mean squared error of each candidate's ``fake_quant(rows, *params)``, ``rows`` ``(K, M)``."""
    n_cand = params[0].shape[0]
    if n_cand * rows.numel() <= BATCHED_SEARCH_LIMIT:
        return fake_quant(rows.unsqueeze(0), *(p[..., None] for p in params)).sub_(rows).square_().mean(-1)
    return torch.stack([fake_quant(rows, *(p[i][:, None] for p in params)).sub_(rows).square_().mean(-1)
                        for i in range(n_cand)])


def _first_minimum(err: torch.Tensor) -> torch.Tensor:
    """``(1, K)`` index of the lowest error per group, the first candidate on ties (as the reference's
    strict ``<``); a NaN error never wins."""
    return torch.nan_to_num(err, nan=float("inf")).argmin(0, keepdim=True)


class Quantizer(nn.Module):
    """State shared by every quantizer: bits, granularity, lazy init, enable/disable; parameters are buffers of
    the group shape, reshaped to broadcast against the input at each forward. Subclasses define
    ``calibrate(x)`` (set the parameters from ``x``) and ``fake_quant(x)``."""

    _param_names: tuple[str, ...] = ()

    def __init__(self, bits: int, granularity: str = "tensor", channel_dim: int = -1,
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES, search: str = "mse"):
        super().__init__()
        self.bits = check_quant_bits(bits)
        self.granularity = one_of(granularity, GRANULARITIES, "granularity")
        self.search = one_of(search, SEARCHES, "range search")
        self.channel_dim = channel_dim
        self.percentiles = tuple(float(p) for p in percentiles)
        if not self.percentiles or any(not 0.5 <= p <= 1.0 for p in self.percentiles):
            raise EamError(f"range-search percentiles {percentiles} must be non-empty and in [0.5, 1]")
        self.enabled = True
        for name in self._param_names:
            self.register_buffer(name, None)

    @property
    def inited(self) -> bool:
        """Its parameters are set, and every inner quantizer's (SLQ's log quantizer, PMQ's bit groups)."""
        return (all(getattr(self, n) is not None for n in self._param_names)
                and all(q.inited for q in self.modules() if q is not self and isinstance(q, Quantizer)))

    def reset(self) -> None:
        """Forget the calibrated parameters (inner quantizers' too): the next forward re-initialises them."""
        for q in find_quantizers(self):
            for n in q._param_names:
                setattr(q, n, None)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, granularity={self.granularity}, search={self.search}, "
                f"enabled={self.enabled}, inited={self.inited}")

    def _view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p if p.dim() == 0 else p.reshape(param_shape(x, self.granularity, self.channel_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.inited:
            self.calibrate(x)
        return self.fake_quant(x)

    def _group_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.granularity == "tensor":
            return ()
        if self.granularity == "channel":
            return (x.shape[self.channel_dim],)
        return tuple(x.shape[1:-1])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Parameters have data-dependent shapes (absent until calibrated): take whatever was saved.
        for n in self._param_names:
            key = prefix + n
            if key in state_dict:
                setattr(self, n, state_dict[key].detach().clone())
            elif strict:
                missing_keys.append(key)


class UniformQuantizer(Quantizer):
    """Asymmetric uniform quantizer with RepQ-ViT's percentile + MSE range search.

    Args:
        channel_dim: the channel dimension for ``"channel"`` granularity (0 for weights, -1 for activations).
        percentiles: candidate upper percentiles p (the lower is 1-p), searched in order.
        search: ``"mse"`` (RepQ-ViT) or ``"minmax"`` (the min/max range, no search; log quantizers: Δ = max).
    """

    _param_names = ("delta", "zero_point")

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_fake_quant(x, self._view(self.delta, x), self._view(self.zero_point, x), self.bits)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` (``uint8``, the shape of ``x``) that :meth:`fake_quant` dequantizes."""
        return uniform_codes(x, self._view(self.delta, x), self._view(self.zero_point, x), self.bits)

    def set_params(self, delta: torch.Tensor | float, zero_point: torch.Tensor | float,
                   granularity: Optional[str] = None) -> None:
        """Set Δ and the zero point (of the group shape; a float zero point is allowed, as RepQ's reparam gives),
        switching to ``granularity`` at the same time where given (e.g. per channel → per tensor)."""
        if granularity is not None:
            self.granularity = one_of(granularity, GRANULARITIES, "granularity")
        self.delta = torch.as_tensor(delta, dtype=torch.float32).detach().clone()
        self.zero_point = torch.as_tensor(zero_point, dtype=torch.float32).detach().clone()

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Search Δ and zp on ``x`` (one vectorised pass over all groups)."""
        x = x.detach()
        rows = to_rows(x, self.granularity, self.channel_dim)
        # (P, K): one candidate range per percentile p (upper q(p), lower q(1-p)) and group.
        if self.search == "minmax":
            lo, hi = rows.amin(1)[None], rows.amax(1)[None]
        else:
            ps = self.percentiles
            q = row_quantiles(rows, list(ps) + [1.0 - p for p in ps])
            hi, lo = q[: len(ps)], q[len(ps):]
        delta = ((hi - lo) / ((1 << self.bits) - 1)).clamp_min(DELTA_FLOOR)
        zp = torch.round(-lo / delta)
        err = _candidate_mse(rows, lambda r, d, z: uniform_fake_quant(r, d, z, self.bits), delta, zp)
        best, shape = _first_minimum(err), self._group_shape(x)
        self.delta = delta.gather(0, best).reshape(shape).float().clone()
        self.zero_point = zp.gather(0, best).reshape(shape).float().clone()


class _LogQuantizer(Quantizer):
    """Log-domain quantizer for non-negative inputs (post-softmax); Δ is the largest level."""

    _param_names = ("delta",)
    _steps_per_octave = 2

    def _fq(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        f = logsqrt2_fake_quant if self._steps_per_octave == 2 else log2_fake_quant
        return f(x, delta, self.bits)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self._fq(x, self._view(self.delta, x))

    def set_params(self, delta: torch.Tensor | float) -> None:
        self.delta = torch.as_tensor(delta, dtype=torch.float32).detach().clone()

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Search Δ among the percentiles of ``x`` (start value: the maximum), lowest MSE first."""
        x = x.detach()
        rows = to_rows(x, self.granularity, self.channel_dim)
        if self.search == "minmax":
            best_delta = rows.amax(1).clamp_min(DELTA_FLOOR)
        else:
            delta = row_quantiles(rows, self.percentiles).clamp_min(DELTA_FLOOR)  # (P, K)
            err = _candidate_mse(rows, self._fq, delta)
            best_delta = delta.gather(0, _first_minimum(err)).squeeze(0)
        self.delta = best_delta.reshape(self._group_shape(x)).float().clone()


class LogSqrt2Quantizer(_LogQuantizer):
    """RepQ-ViT's post-softmax quantizer: ``q = clamp(round(-2·log2(x/Δ)), 0, 2^b-1)``, value ``Δ·2^(-q/2)``.
    Arguments as :class:`UniformQuantizer`'s (RepQ-ViT: per tensor)."""


class Log2Quantizer(_LogQuantizer):
    """``q = clamp(round(-log2(x/Δ)), 0, 2^b-1)``, value ``Δ·2^-q``; arguments as :class:`UniformQuantizer`'s."""

    _steps_per_octave = 1


def make_quantizer(kind: str, bits: int, **kwargs: Any) -> Quantizer:
    """``"uniform"``, ``"logsqrt2"`` or ``"log2"`` quantizer with ``kwargs`` for its constructor."""
    kinds = {"uniform": UniformQuantizer, "logsqrt2": LogSqrt2Quantizer, "log2": Log2Quantizer}
    return kinds[one_of(kind, kinds, "quantizer")](bits, **kwargs)


def find_quantizers(model: nn.Module) -> list[Quantizer]:
    """Every quantizer module of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Enable or disable every quantizer of ``model`` (disabled = full precision, parameters kept)."""
    for q in find_quantizers(model):
        q.enabled = enabled
