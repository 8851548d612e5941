"""RepQ-ViT post-training quantization (Li et al., ICCV 2023), faithful to its published code.

What is quantized (fake-quantized in float, as the reference simulates it):

* every ``nn.Linear`` (classifier head included): weights ``w_bits`` per output row, inputs
  ``a_bits`` per tensor, except the inputs of the LayerNorm → Linear pairs (``norm1 → attn.qkv``,
  ``norm2 → mlp.fc1``, Swin patch merging ``norm → reduction``), which are first calibrated per
  channel and then reparameterized to per tensor;
* every ``nn.Conv2d`` (the patch embedding): weights ``w_bits`` per output channel, its input (the
  image) ``input_bits`` (8) per tensor;
* both attention matmuls: ``q``, ``k``, ``v`` uniform per tensor, the post-softmax map with the
  log√2 quantizer, all at ``a_bits``; ViT computes ``(q @ kᵀ) * scale`` (q and k quantized before
  scaling), Swin scales q first, as in the reference.

Not quantized: softmax input, LayerNorm arithmetic, residual adds, Swin's relative-position bias.

Calibration (:func:`quantize_`): one batch of ``calib_size`` images; pass 1 runs the model with
every quantizer enabled and initialised lazily in forward order, so each layer is calibrated on
already-quantized upstream activations. Then, per LayerNorm → Linear pair, with the pair's per-channel
input parameters ``(Δ_c, zp_c)``: ``Δ_t = mean Δ_c``, ``zp_t = mean zp_c`` (not rounded),
``r = Δ_c/Δ_t``, ``b = min_c/r − min_t``; ``γ ← γ/r``, ``β ← β/r − b``, ``W ← W·r`` (input columns),
``bias ← bias + W_new @ b`` (created when absent), and the input quantizer becomes per tensor
``(Δ_t, zp_t)``. The reference's second forward pass only re-initialises those layers' weight
quantizers, which depend on the weights alone, so they are re-initialised directly (same result,
one forward less).

Model surgery swaps classes (``nn.Linear`` → :class:`QuantLinear`, ``nn.Conv2d`` →
:class:`QuantConv2d`, exact types only) and attaches an :class:`AttentionQuantizers` to each
instrumented attention as ``eam_quant``; LayerNorm → Linear pairs are found from the block classes
(timm ViT ``Block``, Swin ``SwinTransformerBlock`` and ``PatchMerging``), never from module names.
In timm ≥ 0.9 Swin feeds patch merging a 4-D NHWC tensor: the channel is the last dimension.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from timm.layers import Mlp
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from timm.models.vision_transformer import Block

from eamvit.modules.attention import EamAttention, EamWindowAttention, attention_layers
from eamvit.errors import EamError
from eamvit.io import load_tensors, save_tensors
from eamvit.methods.models import ModelSpec, model_spec
from eamvit.modules.quantizers import (DEFAULT_PERCENTILES, JsonConfig, Quantizer, UniformQuantizer, check_quant_bits, find_quantizers,
                         make_quantizer)

FORMAT = "eamvit-repq/1"
ATTN_QUANTIZERS = ("logsqrt2", "log2", "uniform")


@dataclass
class RepQConfig(JsonConfig):
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
    attn_quantizer: str = "logsqrt2"
    vit_scale_first: bool = False
    quantize_head: bool = True

    def validate(self) -> "RepQConfig":
        check_quant_bits(self.w_bits, "w_bits")
        check_quant_bits(self.a_bits, "a_bits")
        check_quant_bits(self.input_bits, "input_bits")
        if isinstance(self.calib_size, bool) or not isinstance(self.calib_size, int) or self.calib_size < 1:
            raise EamError(f"calib_size={self.calib_size!r} must be a positive number of images (RepQ-ViT uses 32)")
        if self.attn_quantizer not in ATTN_QUANTIZERS:
            raise EamError(f"attention quantizer {self.attn_quantizer!r} is not one of {', '.join(ATTN_QUANTIZERS)}")
        self.percentiles = tuple(float(p) for p in self.percentiles)
        return self



# --------------------------------------------------------------------------- quantized modules


class QuantLinear(nn.Linear):
    """``nn.Linear`` with an input and a weight quantizer (set by :func:`prepare_`)."""

    input_quantizer: Quantizer
    weight_quantizer: Quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with an input and a weight quantizer (set by :func:`prepare_`)."""

    input_quantizer: Quantizer
    weight_quantizer: Quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class AttentionQuantizers(nn.Module):
    """The ``eam_quant`` of an instrumented attention: ``q``, ``k``, ``v``, ``attn`` and the score order.

    Args:
        a_bits: bits of all four.
        attn_quantizer: ``"logsqrt2"``, ``"log2"`` or ``"uniform"`` for the post-softmax map.
        scale_first: ``(q·scale) @ kᵀ`` when True, ``(q @ kᵀ)·scale`` when False.
        percentiles: range-search percentiles.
    """

    def __init__(self, a_bits: int, attn_quantizer: str, scale_first: bool,
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        super().__init__()
        self.q = UniformQuantizer(a_bits, percentiles=percentiles)
        self.k = UniformQuantizer(a_bits, percentiles=percentiles)
        self.v = UniformQuantizer(a_bits, percentiles=percentiles)
        self.attn = make_quantizer(attn_quantizer, a_bits, percentiles=percentiles)
        self.scale_first = scale_first

    def extra_repr(self) -> str:
        return f"scale_first={self.scale_first}"


_LINEAR_SWAP: dict[type, type] = {nn.Linear: QuantLinear}
_CONV_SWAP: dict[type, type] = {nn.Conv2d: QuantConv2d}


def _ln_linear(norm: nn.Module, linear: nn.Module) -> Optional[tuple[nn.LayerNorm, nn.Linear]]:
    if isinstance(norm, nn.LayerNorm) and isinstance(linear, nn.Linear) and norm.weight is not None \
            and norm.bias is not None and norm.weight.shape == (linear.in_features,):
        return norm, linear
    return None


def _vit_pairs(block: nn.Module) -> list[Optional[tuple]]:
    out = []
    attn = block.attn
    # A gated attention also feeds norm1's output to ``gate``: the reparam would change it.
    if isinstance(attn, (EamAttention, EamWindowAttention)) and getattr(attn, "gate", None) is None:
        out.append(_ln_linear(block.norm1, attn.qkv))
    if type(block.mlp) is Mlp:
        out.append(_ln_linear(block.norm2, block.mlp.fc1))
    return out


# Exact block types whose LayerNorm output feeds exactly one Linear.
_PAIR_FINDERS: dict[type, Callable[[nn.Module], list]] = {
    Block: _vit_pairs,
    SwinTransformerBlock: _vit_pairs,
    PatchMerging: lambda m: [_ln_linear(m.norm, m.reduction)],
}


def reparam_pairs(model: nn.Module) -> list[tuple[nn.LayerNorm, nn.Linear]]:
    """The LayerNorm → Linear pairs of ``model`` that RepQ-ViT reparameterizes, in module order."""
    pairs = []
    for m in model.modules():
        finder = _PAIR_FINDERS.get(type(m))
        if finder is not None:
            pairs += [p for p in finder(m) if p is not None]
    return pairs


def _head_modules(model: nn.Module) -> set[int]:
    get = getattr(model, "get_classifier", None)
    if get is None:
        return set()
    heads = get()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    return {id(h) for h in heads if isinstance(h, nn.Module)}


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "eam_quant_config", None) is not None


def prepare_(model: nn.Module, config: RepQConfig) -> list[tuple[nn.LayerNorm, nn.Linear]]:
    """Swap in the quantized modules with uninitialised quantizers (no calibration).

    Args:
        model: an instrumented timm ViT / DeiT / Swin (``eamvit.create_model`` instruments it).
        config: :class:`RepQConfig`.

    Returns:
        The LayerNorm → Linear pairs (their Linear inputs are per channel until reparameterized).
    """
    config.validate()
    if is_quantized(model) or find_quantizers(model):
        raise EamError("the model is already quantized; quantize a fresh full-precision model")
    layers = attention_layers(model)  # raises for unsupported families
    pairs = reparam_pairs(model)
    per_channel = {id(lin) for _, lin in pairs}
    heads = _head_modules(model)
    pct = config.percentiles
    for m in list(model.modules()):
        if type(m) in _LINEAR_SWAP and (config.quantize_head or id(m) not in heads):
            m.__class__ = _LINEAR_SWAP[type(m)]
            gran = "channel" if id(m) in per_channel else "tensor"
            m.input_quantizer = UniformQuantizer(config.a_bits, gran, channel_dim=-1, percentiles=pct)
            m.weight_quantizer = UniformQuantizer(config.w_bits, "channel", channel_dim=0, percentiles=pct)
        elif type(m) in _CONV_SWAP:
            m.__class__ = _CONV_SWAP[type(m)]
            m.input_quantizer = UniformQuantizer(config.input_bits, "tensor", percentiles=pct)
            m.weight_quantizer = UniformQuantizer(config.w_bits, "channel", channel_dim=0, percentiles=pct)
    for layer in layers:
        scale_first = True if isinstance(layer, EamWindowAttention) else config.vit_scale_first
        layer.eam_quant = AttentionQuantizers(config.a_bits, config.attn_quantizer, scale_first, pct)
    if not config.reparam:
        pairs = []
    model.eam_quant_config = config
    return pairs


def _calib_images(calib: torch.Tensor | Dataset, config: RepQConfig) -> torch.Tensor:
    """The calibration batch: the first ``calib_size`` images of a tensor, or a seeded random subset of a dataset."""
    n = config.calib_size
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 4:
            raise EamError(f"calibration images must be a (B, C, H, W) tensor, got shape {tuple(calib.shape)}")
        if calib.shape[0] < n:
            raise EamError(f"calibration needs {n} images but {calib.shape[0]} were given; "
                           "lower calib_size (--quant-calib-size) or give more images")
        return calib[:n]
    from eamvit.methods.data import random_subset

    if len(calib) < n:
        raise EamError(f"calibration needs {n} images but the calibration set has {len(calib)}; "
                       "lower calib_size (--quant-calib-size)")
    items = [calib[i] for i in random_subset(calib, n, seed=config.seed)]
    good = [it[0] for it in items if it is not None]
    if len(good) < n:
        raise EamError(f"calibration needs {n} images but only {len(good)} of the {n} chosen could be read; "
                       "lower --calib-size or fix the unreadable files")
    return torch.stack(good)


@torch.no_grad()
def reparameterize_(pairs: Sequence[tuple[nn.LayerNorm, nn.Linear]]) -> None:
    """RepQ-ViT's scale reparameterization of calibrated LayerNorm → QuantLinear pairs, in place.

    The Linear's per-channel input quantizer becomes per tensor, and its weight quantizer is
    re-initialised on the new weights. In full precision the model computes the same function.
    """
    for norm, lin in pairs:
        iq = lin.input_quantizer
        if not isinstance(iq, UniformQuantizer) or not iq.inited or iq.granularity != "channel":
            raise EamError("reparameterization needs calibrated per-channel input quantizers; run quantize_")
        d_c, zp_c = iq.delta.reshape(-1).to(lin.weight.device), iq.zero_point.reshape(-1).to(lin.weight.device)
        min_c = -zp_c * d_c
        d_t, zp_t = d_c.mean(), zp_c.mean()
        min_t = -zp_t * d_t
        r = d_c / d_t
        b = min_c / r - min_t
        norm.weight.data = norm.weight.data / r
        norm.bias.data = norm.bias.data / r - b
        lin.weight.data = lin.weight.data * r
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
        lin.bias.data = lin.bias.data + lin.weight.data @ b
        iq.set_params(d_t, zp_t, granularity="tensor")
        lin.weight_quantizer.reset()
        lin.weight_quantizer.calibrate(lin.weight)


def quantize_(model: nn.Module, config: Optional[RepQConfig] = None,
              calib_images: torch.Tensor | Dataset | None = None) -> nn.Module:
    """Quantize ``model`` in place with RepQ-ViT and return it.

    Args:
        model: an instrumented timm ViT / DeiT (distilled too) / Swin in full precision.
        config: :class:`RepQConfig` (W4/A4, 32 images by default).
        calib_images: a ``(B, C, H, W)`` tensor (its first ``calib_size`` images are used) or a
            dataset of ``(image, target)`` (a seeded random subset of ``calib_size``); preprocess
            with the evaluation transforms.

    Returns:
        ``model``, with ``model.eam_quant_config`` set.

    Raises:
        EamError: bits outside 2..8, too few calibration images, an already quantized or
            unsupported model.
    """
    config = (config or RepQConfig()).validate()
    if calib_images is None:
        raise EamError("RepQ-ViT needs calibration images")
    images = _calib_images(calib_images, config)
    device = next(model.parameters()).device
    model.eval()
    pairs = prepare_(model, config)
    try:
        with torch.no_grad():
            model(images.to(device))  # pass 1: lazy, sequential initialisation
        reparameterize_(pairs)
    except BaseException:
        model.eam_quant_config = None
        raise
    return model


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


# --------------------------------------------------------------------------- save / load


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the quantized state (quantizer parameters + reparameterized weights) to ``path`` (safetensors).

    The JSON metadata holds the :class:`RepQConfig` and the model's :class:`~eamvit.models.ModelSpec`,
    so :func:`load_quantized` refuses a state made for another model.
    """
    config = getattr(model, "eam_quant_config", None)
    if config is None:
        raise EamError("the model is not quantized; run quantize_ (eamvit quantize) first")
    missing = [n for n, q in model.named_modules() if isinstance(q, Quantizer) and not q.inited]
    if missing:
        raise EamError(f"{len(missing)} quantizer(s) were never calibrated (e.g. {missing[0]}); "
                       "calibrate with quantize_ before saving")
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "model": model_spec(model).to_dict(), "config": config.to_dict()}
    save_tensors(path, tensors, meta)
    return Path(path)


def read_quantized_meta(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a quantized-state file, or a clear EamError."""
    return load_tensors(path, FORMAT, "quantized state", "make one with `eamvit quantize`")


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Quantize a fresh full-precision ``model`` from a state saved by :func:`save_quantized`.

    Args:
        model: the same model (name, kwargs, checkpoint) the state was made for, not yet quantized.
        path: the ``.safetensors`` file.

    Returns:
        ``model``, whose logits equal those of the model that was saved.
    """
    meta, tensors = read_quantized_meta(path)
    # Compare as stored: JSON turns the tuples of model kwargs (e.g. Swin depths) into lists.
    spec = ModelSpec(**json.loads(json.dumps(model_spec(model).to_dict())))
    theirs = meta.get("model", {})
    if not spec.same_model(theirs):
        def show(d: dict) -> str:
            ck = d.get("checkpoint_sha256")
            return f"{d.get('name')} {d.get('model_kwargs') or ''}".strip() + (f" checkpoint {ck[:12]}" if ck else "")
        raise EamError(f"quantized state {path} was made for {show(theirs)}, not for {show(spec.to_dict())}; "
                       "quantize this model with `eamvit quantize`")
    config = RepQConfig.from_dict(meta.get("config", {}))
    pairs = prepare_(model, config)
    for norm, lin in pairs:  # the structure the reparameterization left behind
        lin.input_quantizer.granularity = "tensor"
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    own = model.state_dict()
    own_keys = set(own) | {n + "." + p for n, q in model.named_modules() if isinstance(q, Quantizer)
                           for p in q._param_names}
    missing = sorted(own_keys - set(tensors))
    unexpected = sorted(set(tensors) - own_keys)
    shapes = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or shapes:
        model.eam_quant_config = None
        what = (f"{len(missing)} missing, e.g. {missing[0]}" if missing else
                f"{len(unexpected)} unexpected, e.g. {unexpected[0]}" if unexpected else
                f"shape mismatch at {shapes[0]}")
        raise EamError(f"quantized state {path} does not fit this model ({what}); "
                       "quantize it again with `eamvit quantize`")
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=True)
    return model
