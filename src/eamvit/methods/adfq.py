"""ADFQ-ViT post-training quantization (Jiang et al., 2024) on the shared quantizer family; POQ, SLQ, AMO
and where the code and the paper differ: docs/architecture-quant-export.md."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eamvit.choices import ADFQ_ALPHA_FC1, ADFQ_CALIB_SIZE, ADFQ_ITERATIONS
from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.methods.quant_registry import QuantizeHandler, QuantRun, calibration_images
from eamvit.methods.adfq_amo import mlps, reconstruct_, units
from eamvit.methods.repq import RepQConfig, prepare_, reparam_pairs
from eamvit.modules.adfq import (AdaRoundQuantizer, LearnableUniformQuantizer, LogKind, OutlierAwareQuantizer,
                                 OutlierMode, ShiftLogQuantizer, log_quantizer)
from eamvit.modules import family_quant
from eamvit.modules.attention import attention_layers
from eamvit.modules.quant_layers import QuantLinear
from eamvit.modules.quantizers import DEFAULT_PERCENTILES, UniformQuantizer, check_quant_bits, find_quantizers


@dataclass(frozen=True)
class ADFQConfig(Config):
    """ADFQ-ViT settings; defaults are the published code's, the paper's values are noted.

    Args:
        w_bits, a_bits: weight and activation bits, 2..8.
        input_bits: bits of the image fed to the patch embedding.
        poq: Per-Patch Outlier-aware Quantizer on the qkv / fc1 inputs (else per-tensor uniform).
        slq: Shift-Log2 Quantizer on the fc2 input (else per-tensor uniform).
        amo: module-wise reconstruction (else round-to-nearest weights, initial step sizes).
        alpha_qkv, alpha_fc1: outlier thresholds of the qkv input (5) and of the fc1 input (code 5, paper 10).
        outlier_mode: ``"abs"`` (code, ``|x| > α``) or ``"upper"`` (paper eq. 18, ``x ≥ α``).
        shift_log, attn_quantizer: the log quantizer of SLQ and the post-softmax one: ``"logsqrt2"`` (code)
            or ``"log2"`` (paper).
        shift_eps: ε of the shift ``x − min(x) + ε``.
        calib_size: calibration images (1024), read once and kept for the reconstruction.
        init_size: images of the first, lazy initialisation pass (RepQ-ViT's 32).
        iterations: reconstruction iterations per module (code 5000, paper 3000).
        batch_size: reconstruction batch (32).
        w_lr, a_lr: Adam learning rates of the AdaRound variables (3e-3) and of the activation step sizes
            (4e-5, cosine-annealed to 0).
        learn_act: learn the activation step sizes during reconstruction.
        round_weight: λ of the rounding loss (0.01).
        beta_start, beta_end: β at the start (code 20, paper 10) and at the end (2) of the annealing.
        warmup: fraction of iterations without rounding loss (code 0).
        kl_weight: weight of the attention KL term (paper eq. 31: 1).
        zeta, gamma: the rectified sigmoid's stretch ζ (1.1) and shift γ (−0.1).
        percentiles: range-search percentiles of the initial calibration.
        seed: seed of the calibration subset and of the reconstruction batches.
    """

    w_bits: int = 4
    a_bits: int = 4
    input_bits: int = 8
    poq: bool = True
    slq: bool = True
    amo: bool = True
    alpha_qkv: float = 5.0
    alpha_fc1: float = ADFQ_ALPHA_FC1
    outlier_mode: OutlierMode = "abs"
    shift_log: LogKind = "logsqrt2"
    shift_eps: float = 1e-8
    attn_quantizer: LogKind = "logsqrt2"
    calib_size: int = ADFQ_CALIB_SIZE
    init_size: int = 32
    iterations: int = ADFQ_ITERATIONS
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

    KIND = "adfq"
    VERSION = 1

    def _check(self) -> None:
        for name in ("w_bits", "a_bits", "input_bits"):
            check_quant_bits(getattr(self, name), name)
        for name in ("alpha_qkv", "alpha_fc1"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise EamError(f"{name}={v!r} must be a positive outlier threshold (ADFQ-ViT uses 5 for qkv, 5 or 10 for fc1)")
        for name in ("calib_size", "init_size", "iterations", "batch_size"):
            v = getattr(self, name)
            if v < 1:
                raise EamError(f"{name}={v!r} must be an integer >= 1")
        if not 0 < self.beta_end <= self.beta_start:
            raise EamError(f"β must anneal downwards from beta_start to beta_end > 0, got {self.beta_start} → {self.beta_end}")
        if not 0 <= self.warmup < 1:
            raise EamError(f"warmup={self.warmup} must be a fraction in [0, 1)")
        if self.zeta <= 1 or self.gamma >= 0:
            raise EamError(f"the rectified sigmoid needs zeta > 1 and gamma < 0, got {self.zeta}, {self.gamma}")
        if min(self.w_lr, self.a_lr, self.round_weight, self.kl_weight, self.shift_eps) < 0:
            raise EamError("learning rates, loss weights and shift_eps must be >= 0")
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))


def attention_inputs(layers: list[nn.Module]) -> set[int]:
    """``id`` of the Linears inside attention layers (ViT's ``qkv``; a family's q, k, v or kv projections),
    whose post-LayerNorm input takes ``alpha_qkv``; every other one takes ``alpha_fc1``."""
    return {id(m) for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)}


def _refine_(model: nn.Module, config: ADFQConfig, adaround: bool) -> None:
    """RepQ-ViT's surgery (no reparameterization) refined with ADFQ-ViT's quantizers, uncalibrated; ``adaround``:
    AdaRound weight quantizers in the reconstruction units, else the finished model's plain per-channel ones."""
    rcfg = RepQConfig(w_bits=config.w_bits, a_bits=config.a_bits, input_bits=config.input_bits,
                      percentiles=config.percentiles, reparam=False, attn_quantizer=config.attn_quantizer,
                      quantize_head=config.quantize_head)
    pct = config.percentiles
    prepare_(model, rcfg)
    layers = attention_layers(model)
    qkv_ids = attention_inputs(layers)
    # Every per-tensor uniform input quantizer (and q, k, v) gets a learnable step; same state.
    for q in find_quantizers(model):
        if type(q) is UniformQuantizer and q.granularity == "tensor":
            q.__class__ = LearnableUniformQuantizer
    one_token = family_quant.class_token_linears(model)
    for _, lin in reparam_pairs(model):  # LayerNorm → Linear: the post-LayerNorm inputs
        if config.poq and id(lin) not in one_token:
            alpha = config.alpha_qkv if id(lin) in qkv_ids else config.alpha_fc1
            lin.input_quantizer = OutlierAwareQuantizer(config.a_bits, alpha, config.outlier_mode, pct)
        else:
            lin.input_quantizer = LearnableUniformQuantizer(config.a_bits, "tensor", percentiles=pct)
    if config.slq:
        for mlp in mlps(model):
            if isinstance(mlp.fc2, QuantLinear):
                mlp.fc2.input_quantizer = ShiftLogQuantizer(config.a_bits, config.shift_log, config.shift_eps, pct)
    for layer in layers:
        layer.eam_quant.attn = log_quantizer(config.attn_quantizer, config.a_bits, pct)
    if adaround:
        for _, unit in units(model):
            for m in unit.modules():
                if isinstance(m, QuantLinear):
                    m.weight_quantizer = AdaRoundQuantizer(config.w_bits, config.zeta, config.gamma, pct)


@torch.no_grad()
def _bake_adaround_(model: nn.Module) -> None:
    """Replace each AdaRound quantizer by a plain one and its weight by the rounded grid values."""
    for m in model.modules():
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(wq, AdaRoundQuantizer):
            plain = UniformQuantizer(wq.bits, "channel", channel_dim=0, percentiles=wq.percentiles)
            plain.set_params(wq.delta, wq.zero_point)
            m.weight.data = wq.rounded_weight(m.weight.data)
            m.weight_quantizer = plain


def outlier_quantizers(model: nn.Module) -> list[tuple[str, OutlierAwareQuantizer]]:
    """``(qualified Linear name, quantizer)`` of every POQ in module order."""
    return [(n.rsplit(".input_quantizer", 1)[0], q) for n, q in model.named_modules()
            if isinstance(q, OutlierAwareQuantizer)]


def outlier_report(model: nn.Module) -> list[dict[str, Any]]:
    """Per POQ layer: name, α and the outlier ratio seen since the counts were last reset (Fig. 4)."""
    qkv_ids = attention_inputs(attention_layers(model))
    return [{"layer": name, "input_of": "qkv" if id(model.get_submodule(name)) in qkv_ids else "fc1",
             "alpha": q.alpha, "outliers": q.outliers, "values": q.seen, "ratio": q.outlier_ratio}
            for name, q in outlier_quantizers(model)]


def _quantize_adfq(model: nn.Module, config: ADFQConfig, calib: Any, run: QuantRun) -> dict[str, Any]:
    """ADFQ-ViT: surgery; one lazy initialisation pass on the first ``init_size`` calibration images
    (every quantizer calibrated in forward order on already-quantized inputs); then, with ``amo``,
    the module-wise reconstruction on all ``calib_size`` images, which are read only then. Returns
    ``outliers`` per POQ layer on the initialisation batch and ``units`` from :func:`reconstruct_`."""
    n = config.calib_size if config.amo else min(config.init_size, config.calib_size)
    images, _ = calibration_images(calib, n, seed=config.seed)
    _refine_(model, config, adaround=config.amo)
    with torch.no_grad():
        model(images[: config.init_size].to(next(model.parameters()).device))  # lazy, sequential initialisation
    outliers = outlier_report(model)
    unit_rows = reconstruct_(model, images, config, run) if config.amo else []
    _bake_adaround_(model)
    for _, q in outlier_quantizers(model):
        q.reset_counts()
    return {"outliers": outliers, "units": unit_rows}


HANDLER = QuantizeHandler(ADFQConfig, _quantize_adfq, lambda model, config, structure: _refine_(model, config, False))
