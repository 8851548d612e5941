"""Deployable exports: ONNX graphs of full-precision, pruned, frozen and RepQ-ViT-quantized models.

:func:`export_onnx` writes a graph that ONNX Runtime runs on CPU with its standard operators (the
4-bit weight-only graph uses ONNX Runtime's own ``com.microsoft.MatMulNBits``; nothing falls back to a
custom op). The graph comes from ``torch.onnx`` (the TorchScript exporter, ``dynamo=False``, opset
17, or 18 where a family's adapter needs it: it needs no extra package and emits a
``torch.autograd.Function``'s ``symbolic`` node, while the
dynamo exporter needs onnxscript and its own translation tables): the model is copied and its quantized modules are swapped, by class, for export
classes whose forward calls the operators of :mod:`eamvit.ops.qdq`, each of which tells
``torch.onnx`` the node to emit. No protobuf is written by hand; eamvit's metadata (model, data
config, export settings) goes into the model's ``metadata_props``. The batch axis is dynamic; image
size and token counts (pruning at a fixed κ) are static.

Schemes for a RepQ-ViT model (:class:`ExportConfig` ``scheme``):

* ``"qdq"`` (W8/A8 and lower weight widths): ``QuantizeLinear → DequantizeLinear`` on every quantized
  activation (linear and patch-embedding inputs, ``q``, ``k``, ``v``, the post-softmax map) with a
  per-tensor scale, and ``DequantizeLinear`` of per-output-channel int8 weight codes stored in the
  file. ONNX Runtime fuses these into integer kernels (``MatMulIntegerToFloat``, ``QLinearConv``).
* ``"weight-only"``: weights at ``w_bits`` (2, 4 or 8) in ``MatMulNBits`` (per-channel scales repeated
  over the blocks), activations in float; the patch-embedding convolution keeps its dequantized
  weights in float (ONNX Runtime has no low-bit convolution).

Where the runtime cannot express the simulation, :func:`prepare_export_` changes the *model* (call it
on the PyTorch model too, to simulate exactly what the export computes; :func:`export_onnx` applies
it to its copy):

* RepQ-ViT's reparameterized per-tensor zero point is a float mean; ONNX zero points are integers:
  it is rounded (half to even) and clamped to the code range.
* The log√2 post-softmax quantizer has no QDQ form: ``softmax="uniform"`` (default) replaces it by an
  8-bit uniform quantizer on ``[0, Δ]`` (Δ: the log quantizer's largest level, zero point 0);
  ``softmax="fp32"`` leaves the post-softmax map unquantized.
* ``symmetric_activations`` / ``symmetric_weights``: zero point 0 (int8), as TensorRT requires;
  the step becomes ``max(−min/2^(b−1), max/(2^(b−1)−1))`` of the calibrated range.
* Only 8-bit activations have a QDQ form here (``uint8``, or ``int8`` when symmetric).

The graph's *form* follows the runtime that is to run it (:class:`ExportConfig` ``runtime``); the
numbers do not, and both runtimes run both forms:

* ``"onnxruntime"`` (default): each quantized tensor has its ``QuantizeLinear → DequantizeLinear``
  right before the operator that reads it, the pattern ONNX Runtime's QDQ fusions match.
* ``"openvino"``: in the ViT attention (RepQ-ViT's score order, no q/k norm) ``q``, ``k`` and ``v``
  are quantized once, where ``qkv`` makes them (``QuantizeLinear`` per channel of its output, each
  part with its own quantizer's step), reshaped, transposed and split as integer codes, and each
  dequantized where its matmul reads it; the projection's input is quantized at the attention's
  output and dequantized after the head merge. OpenVINO fuses each quantization into the layer that
  precedes it (the fully connected layer, its attention kernel) and runs both attention matmuls in
  int8 when q, k and v are symmetric; in the default form it runs those quantizations as separate
  float nodes with layout conversions around them. ONNX Runtime's per-channel ``QuantizeLinear`` on
  activations is slow, so this form is for OpenVINO only. OpenVINO has no int8 kernel for weights
  with a zero point (it decompresses them to float): a quantized ``qdq`` export for it needs
  ``symmetric_weights``.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import nn

from eamvit.methods.state import state_of, step_config
from eamvit.methods.steps import handler_of
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.io import atomic_path
from eamvit.methods.models import data_config, model_spec
from eamvit.methods.repq import RepQConfig
from eamvit.modules.quant_layers import QuantConv2d, QuantLinear
from eamvit.modules.attention import EamAttention, attention_layers, min_opset, require
from eamvit.modules.quantizers import Log2Quantizer, LogSqrt2Quantizer, UniformQuantizer
from eamvit.ops.onnx_forms import register_symbolics
from eamvit.ops.qdq import (dequantize_linear, dequantize_per_channel, matmul_nbits, pack_nbits_weight,
                            quantize_dequantize, quantize_linear)

from eamvit.methods.export_runtime import FORMAT  # noqa: E402  (one format tag for writer and reader)
FORMATS = ("onnx",)
Scheme = Literal["qdq", "weight-only"]
SCHEMES = get_args(Scheme)
SoftmaxExport = Literal["uniform", "fp32"]
SOFTMAX = get_args(SoftmaxExport)
Runtime = Literal["onnxruntime", "openvino"]
RUNTIMES = get_args(Runtime)
OPSET = 17  # LayerNormalization is one node from 17; per-axis DequantizeLinear needs 13


@dataclass(frozen=True)
class ExportConfig(Config):
    """How a model is exported (saved in the file's metadata).

    Args:
        scheme: quantized models only: ``"qdq"`` (int8 QuantizeLinear/DequantizeLinear) or
            ``"weight-only"`` (``MatMulNBits`` weights, float activations).
        softmax: the log√2 post-softmax quantizer (no QDQ form) exports as an 8-bit ``"uniform"``
            quantizer on ``[0, Δ]`` (default) or as ``"fp32"`` (not quantized).
        symmetric_activations: int8 activations with zero point 0 (TensorRT); default uint8 with the
            calibrated (rounded) zero point.
        symmetric_weights: symmetric per-channel weights (zero point 0); default RepQ's asymmetric ones.
        block_size: ``MatMulNBits`` block (power of two ≥ 16); ``None``: per layer, the largest power
            of two up to 128 that divides the input width (the per-channel scale is repeated per block).
        kept_tokens: add each pruning stage's kept indices as extra outputs ``kept_0``, ``kept_1``, ...
        opset: ONNX opset of the default domain (13..21); ``None``: :data:`OPSET`, or the lowest the
            model needs where its family's adapter asks for more (VOLO's outlook attention, NaFlexViT at
            another grid than its position table's: 18). The file records the opset used.
        runtime: the graph's form: ``"onnxruntime"`` (default) or ``"openvino"`` (see the module notes;
            the same numbers either way).
    """

    KIND = "export"
    VERSION = 1

    scheme: Scheme = "qdq"
    softmax: SoftmaxExport = "uniform"
    symmetric_activations: bool = False
    symmetric_weights: bool = False
    block_size: Optional[int] = None
    kept_tokens: bool = False
    opset: Optional[int] = None
    runtime: Runtime = "onnxruntime"

    def _check(self) -> None:
        b = self.block_size
        if b is not None and (b < 16 or b & (b - 1)):
            raise EamError(f"--block-size {b} must be a power of two ≥ 16 (MatMulNBits)")
        if self.opset is not None and not 13 <= self.opset <= 21:
            raise EamError(f"opset {self.opset} is outside 13..21")

    def check_quantized(self) -> "ExportConfig":
        """Refuse what a quantized model cannot be exported with (before anything is calibrated)."""
        if self.runtime == "openvino" and self.scheme == "qdq" and not self.symmetric_weights:
            raise EamError("OpenVINO has no int8 kernel for weights with a zero point (it would run every layer in "
                           "float); export for it with symmetric weights (--symmetric-weights)")
        return self


TargetForm = Literal["torch", "qdq", "openvino", "weight-only"]
TARGETS = get_args(TargetForm)


@dataclass(frozen=True)
class Target(Config):
    """Where a recipe's model will run: the quantizers it is calibrated with are the ones that runtime
    can express, so the PyTorch model that is evaluated is the model that is shipped.

    Args:
        form: ``"torch"`` (PyTorch, every quantizer as its method defines it), ``"qdq"`` (ONNX int8
            QuantizeLinear/DequantizeLinear: integer zero points, 8-bit activations, the log√2
            post-softmax quantizer replaced from calibration on by ``softmax``), ``"openvino"`` (the
            same with symmetric weights and activations, which OpenVINO runs in int8 kernels, in the
            graph form OpenVINO fuses) or ``"weight-only"`` (ONNX ``MatMulNBits`` weights, float
            activations from calibration on).
        softmax: ``"qdq"``: the post-softmax map as 8-bit ``"uniform"`` on ``[0, Δ]`` (Δ: the log
            quantizer's calibrated top) or ``"fp32"`` (not quantized).
        symmetric_activations: ``"qdq"``: int8 activations with zero point 0 (TensorRT).
        symmetric_weights: ONNX forms: symmetric per-channel weights (zero point 0).
    """

    KIND = "target"
    VERSION = 1

    form: TargetForm = "torch"
    softmax: SoftmaxExport = "uniform"
    symmetric_activations: bool = False
    symmetric_weights: bool = False

    def _check(self) -> None:
        changed = [n for n, v, d in (("softmax", self.softmax, "uniform"),
                                     ("symmetric_activations", self.symmetric_activations, False),
                                     ("symmetric_weights", self.symmetric_weights, False)) if v != d]
        if self.form == "torch" and changed:
            raise EamError(f"{changed[0]} is a setting of an ONNX target, not of target torch; "
                           "choose --target qdq or weight-only, or drop it")
        if self.form == "openvino" and (self.symmetric_activations or self.symmetric_weights):
            raise EamError("target openvino is symmetric already (OpenVINO's int8 kernels take no zero points); "
                           "drop --symmetric-activations and --symmetric-weights")
        if self.form == "weight-only" and changed and changed[0] != "symmetric_weights":
            raise EamError(f"{changed[0]} is a setting of activations, which target weight-only keeps in float; "
                           "drop it, or choose --target qdq")

    @classmethod
    def of(cls, export: "ExportConfig") -> "Target":
        """The target that ``export`` writes."""
        if export.runtime == "openvino" and export.scheme == "qdq":
            return cls(form="openvino", softmax=export.softmax)
        return cls(form=export.scheme, softmax=export.softmax if export.scheme == "qdq" else "uniform",
                   symmetric_activations=export.symmetric_activations and export.scheme == "qdq",
                   symmetric_weights=export.symmetric_weights)

    def export_config(self, **file_settings: Any) -> "ExportConfig":
        """The :class:`ExportConfig` that writes this target, with the file's own settings (block size, opset ...)."""
        if self.form == "torch":
            raise EamError("the model was calibrated for target torch, whose quantizers have no ONNX form; "
                           "compress it with --target qdq (8-bit activations) or --target weight-only")
        if self.form == "openvino":
            return ExportConfig(scheme="qdq", softmax=self.softmax, symmetric_activations=True,
                                symmetric_weights=True, runtime="openvino", **file_settings)
        return ExportConfig(scheme=self.form, softmax=self.softmax, symmetric_activations=self.symmetric_activations,
                            symmetric_weights=self.symmetric_weights, **file_settings)


def default_target(quant: Any) -> Target:
    """The target a recipe gets when none is asked for: ONNX QDQ for RepQ-ViT with 8-bit activations
    (its ONNX form runs in integer kernels), PyTorch for every other quantization."""
    if isinstance(quant, RepQConfig) and quant.a_bits == 8:
        return Target(form="qdq")
    return Target()


def apply_target_(model: nn.Module, target: Optional[Target]) -> nn.Module:
    """Give a just-quantized ``model`` the quantizers ``target`` can express (in place) and record it."""
    if target is None:
        return model
    if step_config(model, "quant") is not None and target.form != "torch":
        prepare_export_(model, target.export_config())
    state_of(model).target = target
    return model


def shape_for_target_(model: nn.Module, target: Target) -> None:
    """Give a rebuilt, uncalibrated quantized ``model`` the quantizer classes ``target`` uses (before its
    stored parameters are loaded)."""
    if target.form == "torch":
        return
    config = target.export_config()
    for owner, attr in activation_quantizers(model):
        _target_quantizer(owner, attr, config)


def _matching_export(model: nn.Module, config: "ExportConfig") -> None:
    """Refuse an export whose settings are not the target the model was calibrated for."""
    target = state_of(model).target
    if target is None or step_config(model, "quant") is None:
        return
    want = target.export_config(block_size=config.block_size, kept_tokens=config.kept_tokens, opset=config.opset)
    if want != config:
        differ = [k for k in ("scheme", "softmax", "symmetric_activations", "symmetric_weights", "runtime")
                  if getattr(want, k) != getattr(config, k)]
        raise EamError(f"the model was calibrated for target {target.form} with {differ[0]}={getattr(want, differ[0])!r}, "
                       f"not {getattr(config, differ[0])!r}: its export would be another model; export with the "
                       f"target's settings, or compress again for the target you want (--target)")


# --------------------------------------------------------------------------- preparing the model


def _repq_config(model: nn.Module) -> Optional[RepQConfig]:
    """The model's RepQ-ViT config (the quantization step refuses other methods: :func:`check_steps`)."""
    return step_config(model, "quant")


def check_steps(model: nn.Module, config: "ExportConfig") -> None:
    """Refuse, before anything is written, a step of ``model``'s recipe that has no form in ``config``'s export."""
    for step in state_of(model).steps.values():
        hook = handler_of(step).export
        if hook is not None:
            hook(model, step, config)


def _quant_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def activation_quantizers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(owner, attribute)`` of every activation quantizer: linear/conv inputs, ``q``, ``k``, ``v``, ``attn``."""
    out = [(m, "input_quantizer") for m in _quant_modules(model)]
    for layer in attention_layers(model):
        qz = getattr(layer, "eam_quant", None)
        if qz is not None:
            out += [(qz, n) for n in ("q", "k", "v", "attn")]
    return out


def _symmetric_step(delta: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Step of a zero-centred range covering ``[−zp·Δ, (2^b − 1 − zp)·Δ]`` with codes ``[−2^(b−1), 2^(b−1) − 1]``."""
    half = 1 << (bits - 1)
    lo, hi = -zp * delta, ((1 << bits) - 1 - zp) * delta
    return torch.maximum(-lo / half, hi / (half - 1)).clamp_min(1e-8)


@torch.no_grad()
def _round_uniform(q: UniformQuantizer, symmetric: bool) -> None:
    """Integer zero point in the code range (both sides of the export use it); optionally symmetric."""
    top = (1 << q.bits) - 1
    zp = torch.round(q.zero_point).clamp(0, top)
    delta = q.delta
    if symmetric:
        delta, zp = _symmetric_step(delta, zp, q.bits), torch.full_like(zp, float(1 << (q.bits - 1)))
    q.delta, q.zero_point = delta.float().clone(), zp.float().clone()


def _target_quantizer(owner: nn.Module, attr: str, config: ExportConfig) -> Any:
    """Put the export's form of activation quantizer ``owner.attr`` in its place and return it (disabled
    where the export keeps that activation in float)."""
    q = getattr(owner, attr)
    if config.scheme == "weight-only":
        q.enabled = False
        return q
    if isinstance(q, (LogSqrt2Quantizer, Log2Quantizer)):
        if config.softmax == "fp32":
            q.enabled = False
            return q
        # Uniform 8-bit on [0, Δ]: Δ is the log quantizer's largest level (the map's calibrated top).
        new = UniformQuantizer(8, "tensor", percentiles=q.percentiles)
        if q.inited:
            new.set_params(q.delta.reshape(()) / 255.0, 0.0)
        new.enabled = q.enabled
        setattr(owner, attr, new)
        q = new
    return q


def _prepare_activation(owner: nn.Module, attr: str, config: ExportConfig) -> None:
    q = _target_quantizer(owner, attr, config)
    if not q.enabled:
        return
    if not isinstance(q, UniformQuantizer) or not q.inited:
        raise EamError("the model has uncalibrated activation quantizers; quantize it (eamvit quantize) first")
    if q.granularity != "tensor" or q.delta.dim() != 0:
        raise EamError("QDQ export needs per-tensor activation quantizers; quantize with RepQ-ViT's "
                       "reparameterization (drop --no-reparam)")
    if q.bits != 8:
        raise EamError(f"QDQ export needs 8-bit activations, the model has {q.bits}-bit ones; quantize with "
                       "--a-bits 8, or --target weight-only")
    _round_uniform(q, config.symmetric_activations)


@torch.no_grad()
def prepare_export_(model: nn.Module, config: Optional[ExportConfig] = None) -> nn.Module:
    """Make ``model`` compute what its export computes, in place (idempotent; full precision: no change).

    Rounds RepQ-ViT's zero points to integers, replaces or disables the log√2 post-softmax quantizer
    (``config.softmax``), makes quantizers symmetric if asked, and for ``"weight-only"`` disables every
    activation quantizer. Call it on a PyTorch model to get the simulated twin of an export.

    Args:
        model: a full-precision or RepQ-ViT-quantized model (pruned and frozen ones too).
        config: :class:`ExportConfig`.

    Returns:
        ``model``.

    Raises:
        EamError: a quantization with no export form (non-RepQ, activations not 8-bit or per channel).
    """
    config = config or ExportConfig()
    check_steps(model, config)
    if _repq_config(model) is None:
        return model
    config.check_quantized()
    for owner, attr in activation_quantizers(model):
        _prepare_activation(owner, attr, config)
    for m in _quant_modules(model):
        wq = m.weight_quantizer
        if not isinstance(wq, UniformQuantizer) or not wq.inited:
            raise EamError("the model has uncalibrated weight quantizers; quantize it (eamvit quantize) first")
        if config.scheme == "weight-only" and isinstance(m, QuantLinear) and wq.bits not in (2, 4, 8):
            raise EamError(f"weight-only export packs 2, 4 or 8-bit weights, the model has {wq.bits}-bit ones")
        _round_uniform(wq, config.symmetric_weights)
    return model


# --------------------------------------------------------------------------- export classes


class QdqActivation(UniformQuantizer):
    """Export class of an enabled activation quantizer: ``QuantizeLinear → DequantizeLinear``."""

    onnx_scale: torch.Tensor
    onnx_zero_point: torch.Tensor

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.onnx_scale, self.onnx_zero_point)


class QdqLinear(QuantLinear):
    """Export class of :class:`QuantLinear`: int8 weight codes, ``DequantizeLinear`` per output channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.on_dequantized(self.input_quantizer(x))

    def on_dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on an input its quantizer has already quantized and dequantized elsewhere in the graph."""
        w = dequantize_per_channel(self.onnx_codes, self.onnx_scale, self.onnx_zero_point)
        return F.linear(x, w, self.bias)


class QdqConv2d(QuantConv2d):
    """Export class of :class:`QuantConv2d` (the patch embedding), as :class:`QdqLinear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_per_channel(self.onnx_codes, self.onnx_scale, self.onnx_zero_point)
        return self._conv_forward(self.input_quantizer(x), w, self.bias)


class NBitsLinear(QuantLinear):
    """Export class of :class:`QuantLinear` for ``"weight-only"``: ``MatMulNBits`` plus the bias."""

    nbits: tuple[int, int, int, int]  # k, n, bits, block size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul_nbits(x, self.onnx_packed, self.onnx_scales, self.onnx_zero_points, *self.nbits)
        return y if self.bias is None else y + self.bias


class DequantizedConv2d(QuantConv2d):
    """Export class of :class:`QuantConv2d` for ``"weight-only"``: the dequantized weight in float."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.onnx_weight, self.bias)


class QdqAttention(EamAttention):
    """Export class of a quantized ViT attention in the ``"openvino"`` form: each quantization where the
    value is made, each dequantization where it is read (the numbers of :class:`EamAttention`'s
    quantized path: the same quantizers on the same values)."""

    onnx_qkv_scale: torch.Tensor  # (3·A,): q's step on q's channels, then k's, then v's
    onnx_qkv_zero_point: torch.Tensor
    onnx_merge_codes: bool  # the projection's input is quantized before the head merge

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qz = self.eam_quant
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        codes = quantize_linear(self.qkv(x), self.onnx_qkv_scale, self.onnx_qkv_zero_point)
        cq, ck, cv = codes.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = (dequantize_linear(c, p.onnx_scale, p.onnx_zero_point) for c, p in ((cq, qz.q), (ck, qz.k), (cv, qz.v)))
        attn = (q @ k.transpose(-2, -1)) * self.scale  # RepQ-ViT's ViT order (scale_first False)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self._eam_post_softmax(attn.softmax(dim=-1), 1, None)
        x = self.attn_drop(attn) @ v
        if not self.onnx_merge_codes:
            return self._eam_out(x.transpose(1, 2).reshape(B, N, self.attn_dim), gate)
        pq = self.proj.input_quantizer
        x = quantize_linear(x, pq.onnx_scale, pq.onnx_zero_point).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj.on_dequantized(dequantize_linear(x, pq.onnx_scale, pq.onnx_zero_point)))


def _setup_openvino_attention(layer: nn.Module) -> None:
    """Swap a ViT attention whose q, k and v are quantized into :class:`QdqAttention`; others keep their form."""
    qz = getattr(layer, "eam_quant", None)
    if type(layer) is not EamAttention or qz is None or qz.scale_first is not False \
            or not isinstance(layer.q_norm, nn.Identity) or not isinstance(layer.k_norm, nn.Identity) \
            or not all(type(getattr(qz, n)) is QdqActivation for n in ("q", "k", "v")):
        return
    width = layer.attn_dim
    layer.register_buffer("onnx_qkv_scale", torch.cat(
        [getattr(qz, n).onnx_scale.expand(width) for n in ("q", "k", "v")]).contiguous())
    layer.register_buffer("onnx_qkv_zero_point", torch.cat(
        [getattr(qz, n).onnx_zero_point.expand(width) for n in ("q", "k", "v")]).contiguous())
    proj = layer.proj
    layer.onnx_merge_codes = (isinstance(layer.norm, nn.Identity) and layer.gate is None and type(proj) is QdqLinear
                              and type(proj.input_quantizer) is QdqActivation)
    layer.__class__ = QdqAttention


def _weight_codes(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, step, zero point)`` of ``m``'s quantized weight: codes in ``[0, 2^b)``, per output channel."""
    wq = m.weight_quantizer
    shape = (-1,) + (1,) * (m.weight.dim() - 1)
    delta, zp = wq.delta.reshape(-1), wq.zero_point.reshape(-1)
    codes = torch.clamp(torch.round(m.weight.detach() / delta.reshape(shape)) + zp.reshape(shape), 0, (1 << wq.bits) - 1)
    return codes, delta, zp


def _setup_qdq_weight(m: nn.Module, config: ExportConfig) -> None:
    codes, delta, zp = _weight_codes(m)
    shift = 1 << (m.weight_quantizer.bits - 1)  # int8 codes (the u8·s8 integer kernels), same values
    if int(zp.min()) - shift < -128 or int(zp.max()) - shift > 127:
        raise EamError("a weight row of one sign has a zero point outside int8; export it with --symmetric-weights")
    m.register_buffer("onnx_codes", (codes - shift).to(torch.int8))
    m.register_buffer("onnx_scale", delta.float().clone())
    m.register_buffer("onnx_zero_point", (zp - shift).to(torch.int8))


def _block_size(k: int, config: ExportConfig) -> int:
    if config.block_size is not None:
        return config.block_size
    return max([b for b in (16, 32, 64, 128) if k % b == 0], default=16)


def _setup_nbits_linear(m: nn.Module, config: ExportConfig) -> None:
    codes, delta, zp = _weight_codes(m)
    bits, (n, k) = m.weight_quantizer.bits, m.weight.shape
    bs = _block_size(k, config)
    packed, scales, zps = pack_nbits_weight(codes, delta, zp, bits, bs)
    m.register_buffer("onnx_packed", packed)
    m.register_buffer("onnx_scales", scales)
    m.register_buffer("onnx_zero_points", zps)
    m.nbits = (k, n, bits, bs)


def _setup_dequantized(m: nn.Module, config: ExportConfig) -> None:
    m.register_buffer("onnx_weight", m.weight_quantizer.fake_quant(m.weight.detach()).clone())


# (scheme, quantized class) -> (export class, set-up)
_EXPORT_SWAP = {
    ("qdq", QuantLinear): (QdqLinear, _setup_qdq_weight),
    ("qdq", QuantConv2d): (QdqConv2d, _setup_qdq_weight),
    ("weight-only", QuantLinear): (NBitsLinear, _setup_nbits_linear),
    ("weight-only", QuantConv2d): (DequantizedConv2d, _setup_dequantized),
}


def _swap_for_export_(model: nn.Module, config: ExportConfig) -> None:
    """Swap a prepared quantized model's classes for their export classes (a copy; never the user's model)."""
    for owner, attr in activation_quantizers(model):
        q = getattr(owner, attr)
        if q.enabled and type(q) is UniformQuantizer:
            q.__class__ = QdqActivation
            zp = int(q.zero_point)
            signed = config.symmetric_activations
            q.register_buffer("onnx_scale", q.delta.reshape(()).float().clone())
            q.register_buffer("onnx_zero_point", torch.tensor(zp - 128 if signed else zp,
                                                              dtype=torch.int8 if signed else torch.uint8))
    for m in _quant_modules(model):
        cls, setup = _EXPORT_SWAP[(config.scheme, type(m))]
        setup(m, config)
        m.__class__ = cls
    if config.runtime == "openvino":
        for layer in attention_layers(model):
            _setup_openvino_attention(layer)


# --------------------------------------------------------------------------- the graph


class _Graph(nn.Module):
    """What the ONNX graph computes: the logits, and with ``kept_tokens`` each pruning stage's kept indices."""

    def __init__(self, model: nn.Module, kept_tokens: bool):
        super().__init__()
        self.model = model
        self.kept_tokens = kept_tokens

    def forward(self, images: torch.Tensor):
        logits = self.model(images)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if not self.kept_tokens:
            return logits
        kept = state_of(self.model).prune.stage_idx
        if any(k is None for k in kept):
            raise EamError("kept_tokens needs a model that prunes at every stage (keep rate < 1)")
        return (logits, *kept)


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: the file, its size, the scheme, and the graph's inputs and outputs."""

    path: str
    bytes: int
    kind: str
    inputs: dict[str, list]
    outputs: list[str]


def _metadata(model: nn.Module, config: ExportConfig, input_size: Sequence[int]) -> dict[str, Any]:
    from eamvit import __version__

    quant = _repq_config(model)
    prune = state_of(model).prune
    merge = state_of(model).merge
    frozen = [l.eam.layer for l in attention_layers(model) if getattr(l, "eam_frozen_mask", None) is not None]
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config(model).items()}
    cfg["input_size"] = list(input_size)
    return {"format": FORMAT, "eamvit_version": __version__, "model": model_spec(model).to_dict(),
            "data_config": cfg, "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "export": config.to_dict(), "quant": quant.to_dict() if quant is not None else None,
            "prune": {**prune.config.to_dict(), "keep_rate": prune.keep_rate} if prune is not None else None,
            "merge": merge.config.to_dict() if merge is not None else None,
            "frozen_layers": frozen,
            # Everything that calibrated the model (quantization, maps): evaluation never scores those images.
            "calibration": list(state_of(model).calibration or [])}


def export_kind(model: nn.Module, config: ExportConfig) -> str:
    """``"fp32"``, ``"qdq W8/A8"``-style label of what an export of ``model`` holds."""
    q = _repq_config(model)
    if q is None:
        return "fp32"
    if config.scheme == "weight-only":
        return f"weight-only W{q.w_bits}"
    return f"qdq W{q.w_bits}/A8"


def _resolve_opset(model: nn.Module, config: ExportConfig, size: Sequence[int]) -> ExportConfig:
    """``config`` with the opset to export at: the one given, or the lowest the model needs at ``size``
    ``(C, H, W)`` (its adapters say); a given one below that need is refused before tracing."""
    need, why = min_opset(model, (int(size[-2]), int(size[-1])))
    if config.opset is None:
        return replace(config, opset=max(OPSET, need))
    if config.opset < need:
        raise EamError(f"ONNX export of {type(model).__name__} needs opset {need} ({why}); "
                       f"export with --opset {need}, or leave --opset out")
    return config


def export_onnx(model: nn.Module, path: str | os.PathLike, config: Optional[ExportConfig] = None, *,
                input_size: Optional[Sequence[int]] = None) -> ExportReport:
    """Write ``model`` as an ONNX graph that ONNX Runtime runs on CPU (input ``images``, output ``logits``).

    The model itself is not changed: a copy is prepared (:func:`prepare_export_`), its quantized
    modules are swapped for export classes, and ``torch.onnx`` traces it with a dynamic batch axis.

    Args:
        model: full precision, pruned (fixed κ), frozen, or RepQ-ViT-quantized, on any device.
        path: the ``.onnx`` file (written atomically).
        config: :class:`ExportConfig`.
        input_size: ``(C, H, W)``; the model's data config by default (the size the built model takes).

    Returns:
        An :class:`ExportReport`.

    Raises:
        EamError: an unwritable path, or a model or setting with no export form.
    """
    import onnx

    target = state_of(model).target
    if config is None:
        config = target.export_config() if target is not None and step_config(model, "quant") is not None else ExportConfig()
    require(attention_layers(model), "export")
    check_steps(model, config)
    _matching_export(model, config)
    size = tuple(int(s) for s in (input_size or data_config(model)["input_size"]))
    config = _resolve_opset(model, config, size)
    meta = _metadata(model, config, size)
    m = copy.deepcopy(model).cpu().eval()
    prepare_export_(m, config)
    _swap_for_export_(m, config)
    if config.kept_tokens and state_of(m).prune is None:
        raise EamError("kept_tokens needs a pruned model (prune_ first, or drop --kept-tokens)")
    graph = _Graph(m, config.kept_tokens)
    x = torch.randn((2, *size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = graph(x)
    names = ["logits"] + [f"kept_{i}" for i in range(len(outs) - 1 if isinstance(outs, tuple) else 0)]
    axes = {n: {0: "batch"} for n in ["images", *names]}
    register_symbolics(config.opset)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            try:
                torch.onnx.export(graph, (x,), str(tmp), dynamo=False, input_names=["images"], output_names=names,
                                  dynamic_axes=axes, opset_version=config.opset,
                                  custom_opsets={"com.microsoft": 1} if config.scheme == "weight-only" else None)
            except torch.onnx.errors.OnnxExporterError as e:
                if "_upsample_bicubic2d_aa" in str(e):  # registered from opset 18 (_register_symbolics)
                    raise EamError("ONNX export of an antialiased resize (NaFlexViT's position grid at another "
                                   "size than its own) needs opset 18; export with --opset 18") from None
                raise EamError(f"torch.onnx cannot export this model: {str(e).splitlines()[0][:300]}") from None
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "eamvit", json.dumps(meta)
        onnx.save(proto, str(tmp))
    return ExportReport(path=str(path), bytes=Path(path).stat().st_size, kind=export_kind(model, config),
                        inputs={"images": ["batch", *size]}, outputs=names)
