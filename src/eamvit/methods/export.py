"""ONNX export of full-precision, pruned, frozen and RepQ-ViT-quantized models, and the deployment
:class:`Target` a recipe calibrates for (schemes and graph forms: docs/architecture-quant-export.md)."""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, get_args

import torch
from torch import nn

from eamvit import __version__
from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.io import atomic_path
from eamvit.methods.evaluate import logits_of
from eamvit.methods.export_runtime import FORMAT, cpu_has_vnni, first_line  # one format tag for writer and reader
from eamvit.methods.models import data_config, model_spec
from eamvit.methods.repq import RepQConfig
from eamvit.methods.state import state_of, step_config
from eamvit.methods.steps import handler_of
from eamvit.modules.attention import attention_layers, min_opset, require
from eamvit.modules.export_forms import activation_quantizers, quant_modules, swap_for_export_
from eamvit.modules.quant_layers import QuantLinear
from eamvit.modules.quantizers import Log2Quantizer, LogSqrt2Quantizer, UniformQuantizer
from eamvit.ops.onnx_forms import register_symbolics

FORMATS = ("onnx",)
SoftmaxExport = Literal["uniform", "fp32"]
SOFTMAX = get_args(SoftmaxExport)
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
        runtime: the graph's form: ``"onnxruntime"`` (default) or ``"openvino"`` (the same numbers either way).
        weight_storage: the integer type of a ``qdq`` file's weights for ONNX Runtime: ``"int8"``, or ``"uint8"``
            with the zero point moved by 128 (the same numbers), which ONNX Runtime multiplies in its exact
            u8·u8 kernels; on x86 CPUs without VNNI its faster u8·s8 kernels add pairs of products in 16 bits
            and saturate. ``None``: ``"uint8"`` where the exporting CPU lacks VNNI, else ``"int8"``.
    """

    KIND = "export"
    VERSION = 1

    scheme: Literal["qdq", "weight-only"] = "qdq"
    softmax: SoftmaxExport = "uniform"
    symmetric_activations: bool = False
    symmetric_weights: bool = False
    block_size: Optional[int] = None
    kept_tokens: bool = False
    opset: Optional[int] = None
    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    weight_storage: Optional[Literal["int8", "uint8"]] = None

    @property
    def ort_qdq(self) -> bool:
        """An int8 QDQ file for ONNX Runtime: the files ``weight_storage`` applies to."""
        return self.scheme == "qdq" and self.runtime == "onnxruntime"

    def _check(self) -> None:
        if self.weight_storage is not None and not self.ort_qdq:
            why = ("target openvino (OpenVINO runs weights with a zero point in float)" if self.runtime == "openvino"
                   else f"target {self.scheme}")
            raise EamError(f"--weight-storage is a setting of ONNX Runtime's int8 QDQ files, not of {why}; drop it")
        b = self.block_size
        if b is not None and (b < 16 or b & (b - 1)):
            raise EamError(f"--block-size {b} must be a power of two ≥ 16 (MatMulNBits)")
        if self.opset is not None and not 13 <= self.opset <= 21:
            raise EamError(f"opset {self.opset} is outside 13..21")


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
        softmax, symmetric_activations, symmetric_weights: as :class:`ExportConfig`'s (``softmax`` and
            ``symmetric_activations`` for ``"qdq"`` only, ``symmetric_weights`` for the ONNX forms).
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

    def check_quant(self, quant: Any) -> None:
        """Refuse, before any calibration, a quantization this target cannot express."""
        if self.form == "torch" or quant is None:
            return
        if not isinstance(quant, RepQConfig):
            raise EamError(f"target {self.form} runs RepQ-ViT's quantizers; {quant.KIND} has no integer-runtime "
                           "form: use --target torch, or quantize with --quant repq")
        if self.form != "weight-only" and quant.a_bits != 8:
            raise EamError(f"target {self.form} runs 8-bit activations, not --a-bits {quant.a_bits}; use --a-bits 8, "
                           "--target weight-only (float activations) or --target torch")

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


def default_target(quant: Any, **settings: Any) -> Target:
    """The target of ``quant`` where none is named: ONNX QDQ for RepQ-ViT with 8-bit activations (its ONNX
    form runs in integer kernels), PyTorch for every other quantization; ``settings`` (``Target`` fields)
    override it."""
    form = "qdq" if isinstance(quant, RepQConfig) and quant.a_bits == 8 else "torch"
    return Target(**{"form": form, **settings})


def apply_target_(model: nn.Module, target: Optional[Target]) -> nn.Module:
    """Give a just-quantized ``model`` the quantizers ``target`` can express (in place) and record it."""
    if target is None:
        return model
    if step_config(model, "quant") is not None and target.form != "torch":
        prepare_export_(model, target.export_config())
    state_of(model).target = target
    return model


def shape_for_target_(model: nn.Module, target: Target) -> None:
    """Give a rebuilt, uncalibrated quantized ``model`` the quantizer classes of ``target`` (before loading)."""
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


def check_steps(model: nn.Module, config: "ExportConfig") -> None:
    """Refuse, before anything is written, a step of ``model``'s recipe that has no form in ``config``'s export."""
    for step in state_of(model).steps.values():
        hook = handler_of(step).export
        if hook is not None:
            hook(model, step, config)


@torch.no_grad()
def _round_uniform(q: UniformQuantizer, symmetric: bool) -> None:
    """Integer zero point in the code range (both sides of the export use it); optionally symmetric."""
    top, half = (1 << q.bits) - 1, 1 << (q.bits - 1)
    zp = torch.round(q.zero_point).clamp(0, top)
    delta = q.delta
    if symmetric:  # the step of a zero-centred range covering [−zp·Δ, (top − zp)·Δ] with codes [−half, half − 1]
        lo, hi = -zp * delta, (top - zp) * delta
        delta, zp = torch.maximum(-lo / half, hi / (half - 1)).clamp_min(1e-8), torch.full_like(zp, float(half))
    q.delta, q.zero_point = delta.float().clone(), zp.float().clone()


def _target_quantizer(owner: nn.Module, attr: str, config: ExportConfig) -> Any:
    """Put the export's form of ``owner.attr`` in its place and return it (disabled where the export keeps it float)."""
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


@torch.no_grad()
def prepare_export_(model: nn.Module, config: Optional[ExportConfig] = None) -> nn.Module:
    """Make ``model`` compute what its export computes, in place (idempotent; full precision: no change): the
    simulated twin of an export (docs/architecture-quant-export.md). A quantization with no export form (not
    RepQ-ViT, activations not 8-bit or per channel) is refused."""
    config = config or ExportConfig()
    check_steps(model, config)
    if step_config(model, "quant") is None:
        return model
    if config.runtime == "openvino" and config.scheme == "qdq" and not config.symmetric_weights:
        raise EamError("OpenVINO has no int8 kernel for weights with a zero point (it would run every layer in "
                       "float); export for it with symmetric weights (--symmetric-weights)")
    for owner, attr in activation_quantizers(model):
        q = _target_quantizer(owner, attr, config)
        if not q.enabled:
            continue
        if not isinstance(q, UniformQuantizer) or not q.inited:
            raise EamError("the model has uncalibrated activation quantizers; quantize it (eamvit quantize) first")
        if q.granularity != "tensor" or q.delta.dim() != 0:
            raise EamError("QDQ export needs per-tensor activation quantizers; quantize with RepQ-ViT's "
                           "reparameterization (drop --no-reparam)")
        if q.bits != 8:
            raise EamError(f"QDQ export needs 8-bit activations, the model has {q.bits}-bit ones; quantize with "
                           "--a-bits 8, or --target weight-only")
        _round_uniform(q, config.symmetric_activations)
    for m in quant_modules(model):
        wq = m.weight_quantizer
        if not isinstance(wq, UniformQuantizer) or not wq.inited:
            raise EamError("the model has uncalibrated weight quantizers; quantize it (eamvit quantize) first")
        if config.scheme == "weight-only" and isinstance(m, QuantLinear) and wq.bits not in (2, 4, 8):
            raise EamError(f"weight-only export packs 2, 4 or 8-bit weights, the model has {wq.bits}-bit ones")
        _round_uniform(wq, config.symmetric_weights)
    return model


class _Graph(nn.Module):
    """What the ONNX graph computes: the logits, and with ``kept_tokens`` each pruning stage's kept indices."""

    def __init__(self, model: nn.Module, kept_tokens: bool):
        super().__init__()
        self.model, self.kept_tokens = model, kept_tokens

    def forward(self, images: torch.Tensor):
        logits = logits_of(self.model, images)
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
    quant, prune, merge = step_config(model, "quant"), state_of(model).prune, state_of(model).merge
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


def _store_weights_unsigned(proto) -> None:
    """Give every DequantizeLinear of int8 constant codes uint8 codes and a zero point moved by 128: each
    dequantized number stays the same, and ONNX Runtime then runs exact u8·u8 kernels (``weight_storage``)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    g = proto.graph
    values = {t.name: t for t in g.initializer}
    values.update({n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant"
                   and len(n.attribute) == 1 and n.attribute[0].name == "value"})
    aliases = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}  # the exporter's shared tensors

    def source(name: str) -> str:
        while name in aliases:
            name = aliases[name]
        return name

    shifted: dict[str, str] = {}  # an int8 constant -> its uint8 copy

    def unsigned(name: str, value: np.ndarray) -> str:
        if name not in shifted:
            shifted[name] = f"{name}_uint8"
            g.initializer.append(numpy_helper.from_array((value.astype(np.int16) + 128).astype(np.uint8),
                                                         shifted[name]))
        return shifted[name]

    for node in g.node:
        codes = source(node.input[0]) if node.op_type == "DequantizeLinear" else ""
        if codes not in values or values[codes].data_type != onnx.TensorProto.INT8:
            continue
        if len(node.input) > 2 and node.input[2]:
            zero = source(node.input[2])
            zero_value = numpy_helper.to_array(values[zero])
        else:  # no zero point: int8's 0, one per scale
            zero = f"{codes}_zero_point"
            zero_value = np.zeros(tuple(values[source(node.input[1])].dims), np.int8)
        node.input.extend([""] * (3 - len(node.input)))
        node.input[0] = unsigned(codes, numpy_helper.to_array(values[codes]))
        node.input[2] = unsigned(zero, zero_value)
    _drop_unread(g)


def _drop_unread(graph) -> None:
    """Remove the initializers, constants and Identity nodes whose values no node or output reads."""
    while True:
        read = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        nodes = [n for n in graph.node if n.op_type not in ("Constant", "Identity") or n.output[0] in read]
        inits = [t for t in graph.initializer if t.name in read]
        if len(nodes) == len(graph.node) and len(inits) == len(graph.initializer):
            return
        del graph.node[:], graph.initializer[:]
        graph.node.extend(nodes)
        graph.initializer.extend(inits)


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
    """Write ``model`` (unchanged: a prepared copy is traced) as an ONNX graph, input ``images``, output ``logits``.

    Args:
        model: full precision, pruned (fixed κ), frozen, or RepQ-ViT-quantized, on any device.
        path: the ``.onnx`` file (written atomically).
        config: ``None``: the model's target's export, else the default :class:`ExportConfig`.
        input_size: ``(C, H, W)``; the model's data config by default (the size the built model takes).
    """
    import onnx

    target, quant = state_of(model).target, step_config(model, "quant")
    if config is None:
        config = target.export_config() if target is not None and quant is not None else ExportConfig()
    require(attention_layers(model), "export")
    check_steps(model, config)
    _matching_export(model, config)
    size = tuple(int(s) for s in (input_size or data_config(model)["input_size"]))
    config = _resolve_opset(model, config, size)
    if quant is not None and config.ort_qdq and config.weight_storage is None:
        config = replace(config, weight_storage="int8" if cpu_has_vnni() is not False else "uint8")
    meta = _metadata(model, config, size)
    m = copy.deepcopy(model).cpu().eval()
    prepare_export_(m, config)
    swap_for_export_(m, config)
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
                raise EamError(f"torch.onnx cannot export this model: {first_line(e)}") from None
        proto = onnx.load(str(tmp))
        if config.weight_storage == "uint8":
            _store_weights_unsigned(proto)
        entry = proto.metadata_props.add()
        entry.key, entry.value = "eamvit", json.dumps(meta)
        onnx.save(proto, str(tmp))
    kind = "fp32" if quant is None else f"{config.scheme} W{quant.w_bits}" + ("/A8" if config.scheme == "qdq" else "")
    return ExportReport(path=str(path), bytes=Path(path).stat().st_size, kind=kind,
                        inputs={"images": ["batch", *size]}, outputs=names)
