"""ADFQ-ViT post-training quantization (Jiang et al., 2024) on the shared quantizer family.

Three components, each switchable (the paper's Table 4 ablation is :func:`ablation_configs`):

* **POQ**, Per-Patch Outlier-aware Quantizer (:class:`OutlierAwareQuantizer`) for the post-LayerNorm
  inputs of ``qkv`` and ``fc1``: per-token Δ and zero point (over batch × channels), and entries
  beyond α kept in full precision as a sparse part. The code's outlier test is ``|x| > α`` (default);
  the paper's eq. 18 is one-sided, ``x ≥ α`` (``outlier_mode="upper"``). α_qkv = 5; α_fc1 = 5 is the
  code's default, the paper says 10 (``alpha_fc1=10``). Off: per-tensor uniform.
* **SLQ**, Shift-Log2 Quantizer (:class:`ShiftLogQuantizer`) for the post-GELU input of ``fc2``:
  ``x − min(x) + ε`` (min recomputed at every forward), log-quantized, shifted back. The code uses
  the log√2 quantizer (default), the paper log2 (``shift_log="log2"``). Off: per-tensor uniform.
* **AMO**, Attention-score enhanced Module-wise Optimization (:func:`reconstruct_`): per attention
  module and per MLP module, AdaRound on the weights (rectified sigmoid, ζ = 1.1, γ = −0.1, rounding
  loss ``Σ 1 − |2h(V) − 1|^β`` with β annealed linearly, code 20 → 2, paper 10 → 2) and learned
  activation step sizes (straight-through rounding); loss = ``Σ_tokens (ŷ − y)²`` averaged over the
  batch (the code's ``lp_loss``) + KL(A‖Â) on the post-softmax attention rows for attention modules
  + λ·rounding loss. Adam, weights lr 3e-3, step sizes lr 4e-5 (cosine-annealed, as the code).
  Off: round-to-nearest weights and the initial step sizes.

Everything else follows the code: weights per output channel; post-softmax log√2 (paper: log2);
q, k, v and the other Linear inputs uniform per tensor with the family's percentile + MSE search;
the image fed to the patch embedding 8-bit. The model surgery is RepQ-ViT's :func:`~.repq.prepare_`
without the reparameterization; the patch embedding and the head are calibrated but not reconstructed.

Paper-vs-code notes: the code's KL term is a temperature softmax (T = 7) over dim 1 of the score
tensor divided by 0.2; here it is the KL divergence of the attention distributions themselves
(paper eq. 32), weighted by ``kl_weight``. The code reconstructs 5000 iterations (paper 3000).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from timm.layers import Mlp
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block

from eamvit.modules.attention import attention_layers
from eamvit.errors import EamError
from eamvit.io import atomic_path
from eamvit.ops.quant import uniform_fake_quant
from eamvit.modules.quantizers import (DEFAULT_PERCENTILES, JsonConfig, DELTA_FLOOR, Log2Quantizer, LogSqrt2Quantizer, Quantizer,
                         UniformQuantizer, check_quant_bits, quantizers, set_quant_enabled)
from eamvit.methods.repq import QuantLinear, RepQConfig, _calib_images, prepare_, reparam_pairs

LOG_KINDS = ("logsqrt2", "log2")
OUTLIER_MODES = ("abs", "upper")
FORMAT = "eamvit-adfq-unit/1"


@dataclass
class ADFQConfig(JsonConfig):
    """ADFQ-ViT settings; defaults are the published code's, the paper's values are noted.

    Args:
        w_bits: weight bits, 2..8.
        a_bits: activation bits, 2..8.
        input_bits: bits of the image fed to the patch embedding.
        poq: Per-Patch Outlier-aware Quantizer on the qkv / fc1 inputs (else per-tensor uniform).
        slq: Shift-Log2 Quantizer on the fc2 input (else per-tensor uniform).
        amo: module-wise reconstruction (else round-to-nearest weights, initial step sizes).
        alpha_qkv: outlier threshold of the qkv input (5).
        alpha_fc1: outlier threshold of the fc1 input (code 5, paper 10).
        outlier_mode: ``"abs"`` (code, ``|x| > α``) or ``"upper"`` (paper eq. 18, ``x ≥ α``).
        shift_log: log quantizer of SLQ: ``"logsqrt2"`` (code) or ``"log2"`` (paper).
        shift_eps: ε of the shift ``x − min(x) + ε``.
        attn_quantizer: post-softmax quantizer: ``"logsqrt2"`` (code) or ``"log2"`` (paper).
        calib_size: calibration images (1024).
        init_size: images of the first, lazy initialisation pass (RepQ-ViT's 32).
        iterations: reconstruction iterations per module (code 5000, paper 3000).
        batch_size: reconstruction batch (32).
        w_lr: Adam learning rate of the AdaRound variables (3e-3).
        a_lr: Adam learning rate of the activation step sizes (4e-5), cosine-annealed to 0.
        learn_act: learn the activation step sizes during reconstruction.
        round_weight: λ of the rounding loss (0.01).
        beta_start: β at the start of the annealing (code 20, paper 10).
        beta_end: β at the end (2).
        warmup: fraction of iterations without rounding loss (code 0).
        kl_weight: weight of the attention KL term (paper eq. 31: 1).
        zeta: rectified-sigmoid stretch ζ (1.1).
        gamma: rectified-sigmoid shift γ (−0.1).
        percentiles: range-search percentiles of the initial calibration.
        quantize_head: quantize the classifier head.
        seed: seed of the calibration subset and of the reconstruction batches.
        checkpoint_dir: folder for one checkpoint per reconstructed module (resumable); None: none.
        progress: tqdm bars with the loss.
    """

    w_bits: int = 4
    a_bits: int = 4
    input_bits: int = 8
    poq: bool = True
    slq: bool = True
    amo: bool = True
    alpha_qkv: float = 5.0
    alpha_fc1: float = 5.0
    outlier_mode: str = "abs"
    shift_log: str = "logsqrt2"
    shift_eps: float = 1e-8
    attn_quantizer: str = "logsqrt2"
    calib_size: int = 1024
    init_size: int = 32
    iterations: int = 5000
    batch_size: int = 32
    w_lr: float = 3e-3
    a_lr: float = 4e-5
    learn_act: bool = True
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.0
    kl_weight: float = 1.0
    zeta: float = 1.1
    gamma: float = -0.1
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    quantize_head: bool = True
    seed: int = 0
    checkpoint_dir: Optional[str] = None
    progress: bool = True

    def validate(self) -> "ADFQConfig":
        check_quant_bits(self.w_bits, "w_bits")
        check_quant_bits(self.a_bits, "a_bits")
        check_quant_bits(self.input_bits, "input_bits")
        for name in ("alpha_qkv", "alpha_fc1"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise EamError(f"{name}={v!r} must be a positive outlier threshold (ADFQ-ViT uses 5 for qkv, 5 or 10 for fc1)")
        for name in ("calib_size", "init_size", "iterations", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EamError(f"{name}={v!r} must be an integer >= 1")
        if self.outlier_mode not in OUTLIER_MODES:
            raise EamError(f"outlier_mode {self.outlier_mode!r} is not one of {', '.join(OUTLIER_MODES)}")
        for name in ("shift_log", "attn_quantizer"):
            if getattr(self, name) not in LOG_KINDS:
                raise EamError(f"{name} {getattr(self, name)!r} is not one of {', '.join(LOG_KINDS)}")
        if not 0 < self.beta_end <= self.beta_start:
            raise EamError(f"β must anneal downwards from beta_start to beta_end > 0, got {self.beta_start} → {self.beta_end}")
        if not 0 <= self.warmup < 1:
            raise EamError(f"warmup={self.warmup} must be a fraction in [0, 1)")
        if self.zeta <= 1 or self.gamma >= 0:
            raise EamError(f"the rectified sigmoid needs zeta > 1 and gamma < 0, got {self.zeta}, {self.gamma}")
        if min(self.w_lr, self.a_lr, self.round_weight, self.kl_weight, self.shift_eps) < 0:
            raise EamError("learning rates, loss weights and shift_eps must be >= 0")
        self.percentiles = tuple(float(p) for p in self.percentiles)
        return self



def ablation_configs(base: Optional[ADFQConfig] = None) -> list[tuple[str, ADFQConfig]]:
    """The eight POQ / SLQ / AMO on-off combinations of the paper's Table 4, in its row order.

    Returns:
        ``(label, config)`` pairs, label like ``"POQ✓ SLQ✗ AMO✓"``.
    """
    base = base or ADFQConfig()
    order = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    mark = lambda b: "✓" if b else "✗"  # noqa: E731
    return [(f"POQ{mark(p)} SLQ{mark(s)} AMO{mark(a)}", replace(base, poq=bool(p), slq=bool(s), amo=bool(a)))
            for p, s, a in order]


# --------------------------------------------------------------------------- quantizers


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _with_grad(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` (the exact fake-quant arithmetic) carrying the gradients of ``surrogate``."""
    return value + (surrogate - surrogate.detach())


def _learning(*ts: Any) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


class LearnableUniformQuantizer(UniformQuantizer):
    """:class:`UniformQuantizer` whose Δ can be learned: LSQ-style straight-through gradients.

    The values always come from :func:`~.functional.uniform_fake_quant`; when Δ or the input needs a
    gradient, the gradient is that of the same formula with straight-through rounding.
    """

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        d, zp = self._view(self.delta, x), self._view(self.zero_point, x)
        if not _learning(d, x):
            return uniform_fake_quant(x, d, zp, self.bits)
        value = uniform_fake_quant(x.detach(), d.detach(), zp, self.bits)
        levels = (1 << self.bits) - 1
        surrogate = (torch.clamp(round_ste(x / d) + zp, 0, levels) - zp) * d
        return _with_grad(value, surrogate)


class _LearnableLogMixin:
    """Learnable Δ and output recording for the log quantizers (post-softmax, SLQ inner quantizer)."""

    record: bool = False
    last: Optional[torch.Tensor] = None
    _steps_per_octave: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # type: ignore[misc]
        if self.record:  # the reconstruction reads the (quantized or FP) attention map with its graph
            self.last = out
        return out

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
    """:class:`LogSqrt2Quantizer` with a learnable Δ and optional output recording."""


class LearnableLog2Quantizer(_LearnableLogMixin, Log2Quantizer):
    """:class:`Log2Quantizer` with a learnable Δ and optional output recording."""


def _log_quantizer(kind: str, bits: int, percentiles: Sequence[float]) -> Quantizer:
    cls = LearnableLogSqrt2Quantizer if kind == "logsqrt2" else LearnableLog2Quantizer
    return cls(bits, percentiles=percentiles)


class OutlierAwareQuantizer(LearnableUniformQuantizer):
    """ADFQ-ViT's Per-Patch Outlier-aware Quantizer: per-token uniform + full-precision outliers.

    ``x = dense + sparse`` with ``sparse = x·[x is an outlier]``; the dense part is quantized per
    token (Δ, zp over batch × channels, calibrated on the dense part only), outliers pass through
    unchanged. Counts of outliers are kept for :func:`outlier_report`.

    Args:
        bits: 2..8.
        alpha: threshold, > 0.
        mode: ``"abs"`` (``|x| > α``, the code) or ``"upper"`` (``x ≥ α``, paper eq. 18).
        percentiles: range-search percentiles of the dense part.
        search: ``"mse"`` (the family's search) or ``"minmax"`` (paper eq. 16–17).
    """

    def __init__(self, bits: int, alpha: float, mode: str = "abs",
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES, search: str = "mse"):
        super().__init__(bits, "token", percentiles=percentiles, search=search)
        if not alpha > 0:
            raise EamError(f"outlier threshold alpha={alpha!r} must be > 0")
        if mode not in OUTLIER_MODES:
            raise EamError(f"outlier mode {mode!r} is not one of {', '.join(OUTLIER_MODES)}")
        self.alpha = float(alpha)
        self.mode = mode
        self.outliers = 0
        self.seen = 0

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
        # Outliers are exactly their full-precision value (the sparse GEMM of the paper), even where
        # a token's range does not contain 0.
        return torch.where(mask, x, super().fake_quant(dense))


class ShiftLogQuantizer(Quantizer):
    """ADFQ-ViT's Shift-Log2 Quantizer: ``Q(x − min x + ε) + min x − ε`` with a log quantizer Q.

    ``min x`` is over the whole tensor and recomputed at every forward (as the code does); Q is the
    inner ``log`` quantizer (Δ searched on the shifted calibration values).

    Args:
        bits: 2..8.
        kind: ``"logsqrt2"`` (code) or ``"log2"`` (paper eq. 23).
        eps: ε.
        percentiles: range-search percentiles of Δ.
    """

    def __init__(self, bits: int, kind: str = "logsqrt2", eps: float = 1e-8,
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        super().__init__(bits, "tensor", percentiles=percentiles)
        if kind not in LOG_KINDS:
            raise EamError(f"shift-log quantizer {kind!r} is not one of {', '.join(LOG_KINDS)}")
        self.kind = kind
        self.eps = float(eps)
        self.log = _log_quantizer(kind, bits, percentiles)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, kind={self.kind}, eps={self.eps}, enabled={self.enabled}"

    @property
    def inited(self) -> bool:
        return self.log.inited

    def reset(self) -> None:
        self.log.reset()

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
    """β at ``step`` (0-based) of ``total``: ``start`` until ``warmup·total``, then linear to ``end``.

    Same as the reference's ``LinearTempDecay`` with its 1-based counter.
    """
    t, t0 = step + 1, warmup * total
    if t < t0:
        return float(start)
    rel = (t - t0) / (total - t0)
    return float(end + (start - end) * max(0.0, 1.0 - rel))


class AdaRoundQuantizer(UniformQuantizer):
    """Per-output-channel weight quantizer with AdaRound's learned rounding.

    ``mode``: ``"nearest"`` (round to nearest, before reconstruction), ``"soft"``
    (``clamp(⌊W/Δ⌋ + h(V) + zp, 0, 2^b − 1)``, differentiable in V) or ``"hard"`` (``h = [V ≥ 0]``,
    the final quantized weights, computed by :func:`~.functional.uniform_fake_quant`).
    ``V`` (``alpha``) is initialised at calibration so that ``h(V)`` is the fractional part of W/Δ.

    Args:
        bits: 2..8.
        zeta, gamma: rectified-sigmoid constants.
        percentiles: range-search percentiles of the per-channel Δ.
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
        return uniform_fake_quant((floor + (self.alpha >= 0).to(w.dtype)) * d, d, zp, self.bits)


# --------------------------------------------------------------------------- model surgery


def _mlps(model: nn.Module) -> list[nn.Module]:
    """timm ``Mlp`` modules of ViT / Swin blocks (exact block and Mlp types), in module order."""
    return [m.mlp for m in model.modules() if type(m) in (Block, SwinTransformerBlock) and type(m.mlp) is Mlp]


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The reconstruction units in forward order: ``("attn", attention)`` and ``("mlp", mlp)`` per block."""
    out: list[tuple[str, nn.Module]] = []
    for m in model.modules():
        if type(m) in (Block, SwinTransformerBlock):
            out.append(("attn", m.attn))
            if type(m.mlp) is Mlp:
                out.append(("mlp", m.mlp))
    return out


def prepare_adfq_(model: nn.Module, config: ADFQConfig) -> None:
    """Swap in ADFQ-ViT's quantized modules with uninitialised quantizers (no calibration).

    Args:
        model: an instrumented timm ViT / DeiT / Swin in full precision.
        config: :class:`ADFQConfig`.
    """
    config.validate()
    rcfg = RepQConfig(w_bits=config.w_bits, a_bits=config.a_bits, input_bits=config.input_bits,
                      percentiles=config.percentiles, reparam=False, attn_quantizer=config.attn_quantizer,
                      quantize_head=config.quantize_head)
    pct = config.percentiles
    prepare_(model, rcfg)
    layers = attention_layers(model)
    qkv_ids = {id(getattr(layer, "qkv", None)) for layer in layers}
    # Every per-tensor uniform input quantizer (and q, k, v) gets a learnable step; same state.
    for q in quantizers(model):
        if type(q) is UniformQuantizer and q.granularity == "tensor":
            q.__class__ = LearnableUniformQuantizer
    for _, lin in reparam_pairs(model):  # LayerNorm → Linear: the post-LayerNorm inputs
        if config.poq:
            alpha = config.alpha_qkv if id(lin) in qkv_ids else config.alpha_fc1
            lin.input_quantizer = OutlierAwareQuantizer(config.a_bits, alpha, config.outlier_mode, pct)
        else:
            lin.input_quantizer = LearnableUniformQuantizer(config.a_bits, "tensor", percentiles=pct)
    if config.slq:
        for mlp in _mlps(model):
            if isinstance(mlp.fc2, QuantLinear):
                mlp.fc2.input_quantizer = ShiftLogQuantizer(config.a_bits, config.shift_log, config.shift_eps, pct)
    for layer in layers:
        layer.eam_quant.attn = _log_quantizer(config.attn_quantizer, config.a_bits, pct)
    if config.amo:
        for kind, unit in units(model):
            for m in unit.modules():
                if isinstance(m, QuantLinear):
                    m.weight_quantizer = AdaRoundQuantizer(config.w_bits, config.zeta, config.gamma, pct)
    model.eam_quant_config = config


# --------------------------------------------------------------------------- outliers


def outlier_quantizers(model: nn.Module) -> list[tuple[str, OutlierAwareQuantizer]]:
    """``(qualified Linear name, quantizer)`` of every POQ in module order."""
    return [(n.rsplit(".input_quantizer", 1)[0], q) for n, q in model.named_modules()
            if isinstance(q, OutlierAwareQuantizer)]


def outlier_report(model: nn.Module) -> list[dict[str, Any]]:
    """Per POQ layer: name, α and the outlier ratio seen since the counts were last reset (Fig. 4)."""
    qkv_ids = {id(getattr(l, "qkv", None)) for l in attention_layers(model)}
    rows = []
    for name, q in outlier_quantizers(model):
        lin = model.get_submodule(name)
        rows.append({"layer": name, "input_of": "qkv" if id(lin) in qkv_ids else "fc1", "alpha": q.alpha,
                     "outliers": q.outliers, "values": q.seen, "ratio": q.outlier_ratio})
    return rows


@torch.no_grad()
def measure_outliers(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> list[dict[str, Any]]:
    """Reset the outlier counts, run ``images`` through the quantized model, return :func:`outlier_report`."""
    for _, q in outlier_quantizers(model):
        q.reset_counts()
    device = next(model.parameters()).device
    model.eval()
    for i in range(0, images.shape[0], batch_size):
        model(images[i:i + batch_size].to(device))
    return outlier_report(model)


# --------------------------------------------------------------------------- reconstruction


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


def _capture(model: nn.Module, unit: nn.Module, images: torch.Tensor, batch_size: int,
             attn_q: Optional[Quantizer], quant: bool) -> dict[str, Any]:
    """Inputs, outputs (and attention maps) of ``unit`` over ``images``, stopping each forward there.

    Tensors are stored per image as ``(n, g, ...)``, ``g`` = unit calls per image (Swin windows).
    """
    device = next(model.parameters()).device
    got: dict[str, Any] = {"x": [], "y": [], "a": [], "kwargs": None}

    def hook(module, args, kwargs, output):
        got["x"].append(args[0].detach())
        got["y"].append(output.detach())
        if got["kwargs"] is None:
            got["kwargs"] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        if attn_q is not None:
            got["a"].append(attn_q.last.detach())
            attn_q.last = None
        raise _Stop

    handle = unit.register_forward_hook(hook, with_kwargs=True)
    if attn_q is not None:
        attn_q.record = True
    set_quant_enabled(model, quant)
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                try:
                    model(images[i:i + batch_size].to(device))
                except _Stop:
                    pass
    finally:
        handle.remove()
        set_quant_enabled(model, True)
        if attn_q is not None:
            attn_q.record, attn_q.last = False, None
    n = images.shape[0]
    out = {"kwargs": got["kwargs"] or {}}
    for k in ("x", "y", "a"):
        if got[k]:
            t = torch.cat(got[k])
            out[k] = t.reshape((n, t.shape[0] // n) + tuple(t.shape[1:]))
    return out


def _flat(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    s = t[idx]
    return s.reshape((-1,) + tuple(s.shape[2:]))


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p‖q) along the last dim (p: full-precision attention, q: quantized).

    Quantized rows no longer sum to 1 (log levels, codes past the last level are 0): they are
    renormalised so the term is a true KL divergence (≥ 0); the MSE term keeps the scale.
    """
    tiny = torch.finfo(q.dtype).tiny
    q = q / q.sum(-1, keepdim=True).clamp_min(tiny)
    return (p * (torch.log(p.clamp_min(tiny)) - torch.log(q.clamp_min(tiny)))).sum(-1).mean()


def _unit_loss(unit: nn.Module, x: torch.Tensor, y: torch.Tensor, a: Optional[torch.Tensor],
               kwargs: dict, attn_q: Optional[Quantizer], kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reconstruction loss, KL)``: ``Σ_tokens‖ŷ − y‖²`` averaged over the batch (the code's lp_loss)."""
    out = unit(x, **kwargs)
    rec = (out - y).pow(2).sum(1).mean()
    kl = torch.zeros((), device=x.device)
    if attn_q is not None and a is not None and kl_weight > 0:
        kl = _kl_rows(a, attn_q.last)
        attn_q.last = None
    return rec, kl


@torch.no_grad()
def _unit_mse(unit: nn.Module, data: dict, batch_size: int) -> float:
    """Mean squared error of the unit's (quantized) output against the full-precision target."""
    total, count = 0.0, 0
    n = data["x"].shape[0]
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(i + batch_size, n))
        out = unit(_flat(data["x"], idx), **data["kwargs"])
        d = out - _flat(data["y"], idx)
        total += float(d.pow(2).sum())
        count += d.numel()
    return total / count


def _unit_state(unit: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{p}": getattr(q, p).detach().cpu().clone() for n, q in unit.named_modules()
            if isinstance(q, Quantizer) for p in q._param_names if getattr(q, p) is not None}


def _load_unit_state(unit: nn.Module, state: dict[str, torch.Tensor]) -> None:
    device = next(unit.parameters()).device
    for key, t in state.items():
        name, p = key.rsplit(".", 1)
        setattr(unit.get_submodule(name), p, t.to(device))
    for m in unit.modules():
        if isinstance(m, AdaRoundQuantizer):
            m.mode = "hard"


def _fingerprint(model: nn.Module, config: ADFQConfig, images: torch.Tensor) -> str:
    """What a checkpoint must match to be reused: settings, weights and calibration images."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("checkpoint_dir", "progress")}
    h = hashlib.sha256(repr(sorted(cfg.items())).encode())
    for t in list(model.state_dict().values())[:8] + [images[: min(8, images.shape[0])]]:
        h.update(t.detach().cpu().float().numpy().tobytes())
    h.update(str(tuple(images.shape)).encode())
    return h.hexdigest()


def _trainables(unit: nn.Module, learn_act: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Turn the unit's AdaRound V and (optionally) activation Δ into leaf tensors for Adam.

    They stay buffers of their quantizers (plain tensors that require grad), so the module structure
    and ``state_dict`` keys never change.
    """
    w, a = [], []
    for m in unit.modules():
        if isinstance(m, AdaRoundQuantizer):
            m.mode = "soft"
            m.alpha = m.alpha.detach().clone().requires_grad_(True)
            w.append(m.alpha)
        elif learn_act and isinstance(m, (LearnableUniformQuantizer, _LearnableLogMixin)) and m.enabled and m.inited:
            m.delta = m.delta.detach().clone().requires_grad_(True)
            a.append(m.delta)
    return w, a


def _finish(unit: nn.Module) -> None:
    """Back to plain buffers: hard rounding, positive step sizes."""
    for m in unit.modules():
        if isinstance(m, AdaRoundQuantizer):
            m.alpha = m.alpha.detach().clone()
            m.mode = "hard"
        elif isinstance(m, (LearnableUniformQuantizer, _LearnableLogMixin)) and m.inited:
            m.delta = m.delta.detach().clamp_min(DELTA_FLOOR).clone()


def _reconstruct_unit(unit: nn.Module, kind: str, data: dict, attn_q: Optional[Quantizer],
                      config: ADFQConfig, desc: str, gen: torch.Generator) -> list[float]:
    """AdaRound + step-size learning of one unit on cached data; returns the loss history (every step)."""
    frozen = [p for p in unit.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    w, a = _trainables(unit, config.learn_act)
    opt_w = torch.optim.Adam(w, lr=config.w_lr) if w else None
    opt_a = torch.optim.Adam(a, lr=config.a_lr) if a else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=config.iterations, eta_min=0.0) if opt_a else None
    ada = [m for m in unit.modules() if isinstance(m, AdaRoundQuantizer)]
    n = data["x"].shape[0]
    losses: list[float] = []
    if attn_q is not None:
        attn_q.record = True
    bar = tqdm(range(config.iterations), desc=desc, disable=not config.progress, leave=False, dynamic_ncols=True)
    try:
        with torch.enable_grad():
            for it in bar:
                idx = torch.randint(0, n, (min(config.batch_size, n),), generator=gen)
                rec, kl = _unit_loss(unit, _flat(data["x"], idx), _flat(data["y"], idx),
                                     _flat(data["a"], idx) if "a" in data else None, data["kwargs"], attn_q,
                                     config.kl_weight)
                beta = beta_schedule(it, config.iterations, config.beta_start, config.beta_end, config.warmup)
                rnd = sum((round_loss(m.alpha, beta, config.zeta, config.gamma) for m in ada),
                          torch.zeros((), device=rec.device))
                if it + 1 < config.warmup * config.iterations:
                    rnd = rnd * 0
                loss = rec + config.kl_weight * kl + config.round_weight * rnd
                for o in (opt_w, opt_a):
                    if o is not None:
                        o.zero_grad(set_to_none=True)
                loss.backward()
                for o in (opt_w, opt_a, sched):
                    if o is not None:
                        o.step()
                losses.append(float(loss.detach()))
                if it % 10 == 0 or it + 1 == config.iterations:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", rec=f"{float(rec.detach()):.4g}", kl=f"{float(kl.detach()):.3g}",
                                    beta=f"{beta:.1f}")
    finally:
        bar.close()
        if attn_q is not None:
            attn_q.record, attn_q.last = False, None
        _finish(unit)
        for p in frozen:
            p.requires_grad_(True)
    return losses


def reconstruct_(model: nn.Module, images: torch.Tensor, config: ADFQConfig) -> list[dict[str, Any]]:
    """Attention-score enhanced Module-wise Optimization of an initialised ADFQ model, in place.

    Units (attention, MLP) in forward order; each is trained on its input in the already quantized
    model (earlier units reconstructed) against the full-precision model's output (and attention).
    With ``config.checkpoint_dir`` each finished unit is saved atomically and reused on a rerun with
    the same settings, weights and images.

    Returns:
        Per unit: ``unit``, ``kind``, ``mse_before`` (round-to-nearest), ``mse_after``, ``loss_first``,
        ``loss_last``, ``seconds``, ``resumed``.
    """
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    fp = _fingerprint(model, config, images) if ckpt_dir else ""
    gen = torch.Generator().manual_seed(config.seed)
    report = []
    all_units = units(model)
    names = {id(m): n for n, m in model.named_modules()}
    for i, (kind, unit) in enumerate(all_units):
        attn_q = unit.eam_quant.attn if kind == "attn" and getattr(unit, "eam_quant", None) is not None else None
        path = ckpt_dir / f"unit_{i:03d}.pt" if ckpt_dir else None
        row: dict[str, Any] = {"unit": names.get(id(unit), str(i)), "kind": kind}
        if path is not None and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("format") != FORMAT or saved.get("fingerprint") != fp:
                raise EamError(f"checkpoint {path} was made with other settings, weights or images; "
                               "use another checkpoint_dir or delete it")
            _load_unit_state(unit, saved["state"])
            report.append({**row, **saved["row"], "resumed": True})
            continue
        t0 = time.perf_counter()
        target = _capture(model, unit, images, config.batch_size, attn_q, quant=False)
        data = _capture(model, unit, images, config.batch_size, None, quant=True)
        data["y"] = target["y"]
        if "a" in target:
            data["a"] = target["a"]
        row["mse_before"] = _unit_mse(unit, data, config.batch_size)
        losses = _reconstruct_unit(unit, kind, data, attn_q, config, f"ADFQ {kind} {i + 1}/{len(all_units)}", gen)
        row.update(mse_after=_unit_mse(unit, data, config.batch_size), loss_first=losses[0], loss_last=losses[-1],
                   seconds=time.perf_counter() - t0, resumed=False)
        report.append(row)
        if path is not None:
            with atomic_path(path) as tmp:
                torch.save({"format": FORMAT, "fingerprint": fp, "state": _unit_state(unit), "row": row}, tmp)
    return report


def quantize_(model: nn.Module, config: Optional[ADFQConfig] = None,
              calib_images: torch.Tensor | Dataset | None = None) -> nn.Module:
    """Quantize ``model`` in place with ADFQ-ViT and return it (mirrors :func:`.repq.quantize_`).

    Steps: model surgery; one lazy initialisation pass on the first ``init_size`` calibration images
    (every quantizer calibrated in forward order on already-quantized inputs); then, with ``amo``,
    the module-wise reconstruction on all ``calib_size`` images.

    Args:
        model: an instrumented timm ViT / DeiT / Swin in full precision.
        config: :class:`ADFQConfig`.
        calib_images: a ``(B, C, H, W)`` tensor (its first ``calib_size`` images) or a dataset of
            ``(image, target)`` (a seeded random subset of ``calib_size``).

    Returns:
        ``model`` with ``eam_quant_config`` (the config) and ``eam_quant_report`` (``outliers`` per
        POQ layer on the initialisation batch, ``units`` from :func:`reconstruct_`, ``calib_seconds``).

    Raises:
        EamError: bad settings, too few images, an already quantized or unsupported model.
    """
    config = (config or ADFQConfig()).validate()
    if calib_images is None:
        raise EamError("ADFQ-ViT needs calibration images")
    t0 = time.perf_counter()
    images = _calib_images(calib_images, config)
    device = next(model.parameters()).device
    model.eval()
    prepare_adfq_(model, config)
    try:
        with torch.no_grad():
            model(images[: config.init_size].to(device))  # lazy, sequential initialisation
        outliers = outlier_report(model)
        unit_rows = reconstruct_(model, images, config) if config.amo else []
    except BaseException:
        model.eam_quant_config = None
        raise
    for _, q in outlier_quantizers(model):
        q.reset_counts()
    model.eam_quant_report = {"outliers": outliers, "units": unit_rows, "calib_seconds": time.perf_counter() - t0}
    return model
