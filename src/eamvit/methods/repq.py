"""RepQ-ViT post-training quantization (Li et al., ICCV 2023), faithful to its published code; what is
quantized and the reparameterization: docs/architecture-quant-export.md."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from eamvit.choices import ATTN_QUANTIZERS, AttnQuantizer  # noqa: F401 (re-exported; defined torch-free for the CLI)
from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.methods.data import run_first_forward
from eamvit.methods.quant_registry import QuantizeHandler, QuantRun, calibration_images
from eamvit.modules import family_quant
from eamvit.modules.attention import ADAPTERS, attention_layers
from eamvit.modules.quant_layers import AttentionQuantizers, QuantConv2d, QuantLinear
from eamvit.modules.quantizers import DEFAULT_PERCENTILES, UniformQuantizer, check_quant_bits


@dataclass(frozen=True)
class RepQConfig(Config):
    """RepQ-ViT settings; defaults are the reference code's.

    Args:
        w_bits: weight bits, 2..8.
        a_bits: activation bits (linear inputs, q, k, v, post-softmax), 2..8, independent of ``w_bits``.
        input_bits: bits of the image fed to the patch-embedding conv (8, per tensor).
        calib_size: calibration images (one batch; the reference uses 32).
        seed: seed of the random choice of calibration images from a dataset.
        percentiles: range-search percentiles (uniform: ``[q(1-p), q(p)]``; log√2: ``Δ = q(p)``).
        reparam: apply the LayerNorm → Linear scale reparameterization (False keeps the post-LayerNorm
            inputs per channel, an upper bound that hardware cannot run).
        attn_quantizer: post-softmax quantizer: ``"logsqrt2"`` (RepQ-ViT's code and paper; the paper's
            bit-shift deployment form gives the same values), ``"log2"`` (plain power-of-two levels,
            coarser) or ``"uniform"`` (per tensor, with the same range search).
        vit_scale_first: ViT score order; False is the reference ``(q @ kᵀ)·scale``, True is timm's
            own ``(q·scale) @ kᵀ`` (Swin always scales q first, as the reference does).
        quantize_head: quantize the classifier head (the reference does).
    """

    w_bits: int = 4
    a_bits: int = 4
    input_bits: int = 8
    calib_size: int = 32
    seed: int = 0
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    reparam: bool = True
    attn_quantizer: AttnQuantizer = "logsqrt2"
    vit_scale_first: bool = False
    quantize_head: bool = True

    KIND = "repq"
    VERSION = 1

    def _check(self) -> None:
        for name in ("w_bits", "a_bits", "input_bits"):
            check_quant_bits(getattr(self, name), name)
        if self.calib_size < 1:
            raise EamError(f"calib_size={self.calib_size!r} must be a positive number of images (RepQ-ViT uses 32)")
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))


# Exact block types whose LayerNorm output feeds only Linears, as the adapters name them.
_PAIR_FINDERS: dict[type, Callable[[nn.Module], list]] = {cls: find for a in ADAPTERS
                                                          for cls, find in a.quant.groups.items()}


def reparam_pairs(model: nn.Module) -> list[tuple[nn.LayerNorm, nn.Linear]]:
    """The LayerNorm → Linear pairs of ``model`` that RepQ-ViT reparameterizes, in module order.

    A norm that feeds several Linears gives one pair per Linear, consecutive, the Linear whose input
    quantizer sets the group's parameters first (see :func:`reparameterize_`).
    """
    attention_layers(model)  # the groups read each attention's input Linears from its adapter
    pairs = []
    for m in model.modules():
        for p in _PAIR_FINDERS.get(type(m), lambda block: ())(m):
            if p is not None:  # (norm, the Linears it feeds)
                pairs += [(p[0], lin) for lin in p[1]]
    return pairs


def _groups(pairs: Sequence[tuple[nn.LayerNorm, nn.Linear]]) -> list[tuple[nn.LayerNorm, list[nn.Linear]]]:
    """Consecutive pairs of one norm, as ``(norm, linears)``."""
    out: list[tuple[nn.LayerNorm, list[nn.Linear]]] = []
    for norm, lin in pairs:
        if out and out[-1][0] is norm:
            out[-1][1].append(lin)
        else:
            out.append((norm, [lin]))
    return out


def classifier_heads(model: nn.Module) -> list[nn.Module]:
    """The modules of a timm classifier's head (``get_classifier``; several for distilled models), or none."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    return [h for h in (heads if isinstance(heads, (tuple, list)) else (heads,)) if isinstance(h, nn.Module)]


def prepare_(model: nn.Module, config: RepQConfig) -> list[tuple[nn.LayerNorm, nn.Linear]]:
    """Swap in the quantized modules with uninitialised quantizers (no calibration) and return the
    LayerNorm → Linear pairs to reparameterize (their Linear inputs are per channel until then)."""
    layers = attention_layers(model)  # raises for unsupported families
    pairs = reparam_pairs(model)
    per_channel = {id(lin) for _, lin in pairs}
    heads = {id(h) for h in classifier_heads(model)}
    in_float = family_quant.float_linears(model)
    family_quant.separate_biases_(model)
    pct = config.percentiles
    for m in list(model.modules()):
        if type(m) is nn.Linear and (config.quantize_head or id(m) not in heads) and id(m) not in in_float:
            m.__class__ = QuantLinear
            gran = "channel" if id(m) in per_channel else "tensor"
            m.input_quantizer = UniformQuantizer(config.a_bits, gran, channel_dim=-1, percentiles=pct)
            m.weight_quantizer = UniformQuantizer(config.w_bits, "channel", channel_dim=0, percentiles=pct)
        elif type(m) is nn.Conv2d:
            m.__class__ = QuantConv2d
            m.input_quantizer = UniformQuantizer(config.input_bits, "tensor", percentiles=pct)
            m.weight_quantizer = UniformQuantizer(config.w_bits, "channel", channel_dim=0, percentiles=pct)
    for layer in layers:
        # None: a tapped family quantizes the operands of timm's own score matmul, in timm's order.
        scale_first = {"timm": None, "scale_first": True, "config": config.vit_scale_first}[
            layer.eam.adapter.quant.score_order]
        layer.eam_quant = AttentionQuantizers(config.a_bits, config.attn_quantizer, scale_first, pct)
    return pairs if config.reparam else []


@torch.no_grad()
def reparameterize_(pairs: Sequence[tuple[nn.LayerNorm, nn.Linear]]) -> None:
    """RepQ-ViT's scale reparameterization of calibrated LayerNorm → QuantLinear pairs, in place (the same
    function in full precision; per-tensor inputs, weight quantizers re-initialised on the new weights)."""
    for norm, lins in _groups(pairs):
        for lin in lins:
            iq = lin.input_quantizer
            if not isinstance(iq, UniformQuantizer) or not iq.inited or iq.granularity != "channel":
                raise EamError("reparameterization needs calibrated per-channel input quantizers; run eamvit.quantize_")
        # A norm feeding several Linears: the first one's parameters serve all (one norm, one scaling).
        iq, dev = lins[0].input_quantizer, lins[0].weight.device
        d_c, zp_c = iq.delta.reshape(-1).to(dev), iq.zero_point.reshape(-1).to(dev)
        min_c = -zp_c * d_c
        d_t, zp_t = d_c.mean(), zp_c.mean()
        min_t = -zp_t * d_t
        r = d_c / d_t
        b = min_c / r - min_t
        norm.weight.data = norm.weight.data / r
        norm.bias.data = norm.bias.data / r - b
        for lin in lins:
            lin.weight.data = lin.weight.data * r
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
            lin.bias.data = lin.bias.data + lin.weight.data @ b
            lin.input_quantizer.set_params(d_t, zp_t, granularity="tensor")
            lin.weight_quantizer.reset()
            lin.weight_quantizer.calibrate(lin.weight)


@torch.no_grad()
def calibrate_(model: nn.Module, images: torch.Tensor, pairs: Sequence[tuple[nn.LayerNorm, nn.Linear]]) -> None:
    """Pass 1 (every quantizer initialised lazily in forward order) then the reparameterization."""
    model(images.to(next(model.parameters()).device))
    reparameterize_(pairs)


def reparam_structure_(pairs: Sequence[tuple[nn.LayerNorm, nn.Linear]]) -> None:
    """What :func:`reparameterize_` changes in the structure (per-tensor inputs, a bias), without data."""
    for _, lin in pairs:
        lin.input_quantizer.granularity = "tensor"
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))


def _quantize_repq(model: nn.Module, config: RepQConfig, calib: Any, run: QuantRun) -> dict[str, Any]:
    """RepQ-ViT: pass 1 on one batch of ``calib_size`` images, then the reparameterization. With
    ``run.forward_loop``, pass 1 is the loop's first forward (then the loop is stopped), whose tensor input
    must hold ``calib_size`` images (checked before any surgery)."""
    if run.forward_loop is not None:
        n = run_first_forward(model, run.forward_loop, before=True)
        if n and n != config.calib_size:
            raise EamError(f"RepQ-ViT calibrates on one batch of calib_size={config.calib_size} images, but the first "
                           f"forward of forward_loop has {n}; set calib_size={n} or feed {config.calib_size} at once")
        pairs = prepare_(model, config)
        with torch.no_grad():
            n = run_first_forward(model, run.forward_loop)
        reparameterize_(pairs)
        return {"calib_images": n or None}
    images, _ = calibration_images(calib, config.calib_size, seed=config.seed)
    calibrate_(model, images, prepare_(model, config))
    return {"calib_images": int(images.shape[0])}


HANDLER = QuantizeHandler(RepQConfig, _quantize_repq, forward_loop=True,
                          rebuild=lambda model, config, structure: reparam_structure_(prepare_(model, config)))


def attn_deltas(model: nn.Module) -> list[torch.Tensor]:
    """Per attention layer, the post-softmax quantizer's Δ (for freezing values with the same quantizer)."""
    out = []
    for layer in attention_layers(model):
        qz = getattr(layer, "eam_quant", None)
        if qz is None or not qz.attn.inited:
            raise EamError("the model has no calibrated attention quantizers; quantize it first")
        if qz.attn.delta.dim() != 0:
            raise EamError("frozen values need a per-tensor post-softmax quantizer")
        out.append(qz.attn.delta.detach().cpu())
    return out
