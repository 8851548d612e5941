"""The one quantization verb, and one save / load (weights as packed integer codes) for every method
(docs/architecture-quant-export.md)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from eamvit.methods.state import state_of, step_config
from eamvit.methods.steps import StepHandler, StepInputs, handler_of, register_step, step_types
from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.io import load_tensors, save_tensors, tensors_sha256
from eamvit.methods.data import ForwardLoop, add_calibration, calibration_record, check_forward_loop
from eamvit.methods import adfq, pmq, repq
from eamvit.methods.export import Target, apply_target_, shape_for_target_
from eamvit.methods.models import check_same_model, data_config, model_spec, preprocessing
from eamvit.methods.quant_registry import QuantizeHandler, QuantRun
from eamvit.modules.attention import attention_layers, require
from eamvit.modules.quantizers import MAX_BITS, MIN_BITS, Quantizer, UniformQuantizer, find_quantizers
from eamvit.ops.pack import pack_bits, packed_size, unpack_bits
from eamvit.ops.quant import uniform_dequant

FORMAT = "eamvit-quant/1"
_CODES = ".codes"


def config_type(kind: Any) -> type:
    """The config class of quantization method ``kind`` (``"repq"``, ``"adfq"``, ``"pmq"``)."""
    kinds = {cls.KIND: cls for cls in step_types("quant")}
    if not isinstance(kind, str) or kind not in kinds:
        raise EamError(f"quantization method {kind!r} is not one of {', '.join(kinds)}")
    return kinds[kind]


def default_bits(exported: bool = False) -> int:
    """Weight and activation bits when none are asked for: RepQ-ViT's W4/A4, or 8 for a model to export
    (``exported``), whose integer (QDQ) form takes 8-bit activations."""
    return 8 if exported else repq.RepQConfig.w_bits


def calibration_need(methods: Any, adfq_calib_size: Optional[int] = None) -> int:
    """Calibration images quantizing by the method names ``methods`` reads beyond a data split's default
    512: ADFQ-ViT's ``adfq_calib_size`` (else its protocol's 1024); RepQ-ViT and PMQ read 32 (0)."""
    if "adfq" not in {str(m).strip() for m in methods}:
        return 0
    return adfq.ADFQConfig.calib_size if adfq_calib_size is None else adfq_calib_size


def quantize_(model: nn.Module, config: Config, calib: Any = None, *, forward_loop: Optional[ForwardLoop] = None,
              device: torch.device | str | None = None, progress: bool = True,
              checkpoint_dir: Optional[str | os.PathLike] = None) -> nn.Module:
    """Quantize ``model`` in place with the method ``config`` names; its state then holds the config
    (``steps["quant"]``) and the method's report with ``calib_seconds`` (``reports["quant"]``).

    Args:
        model: a timm ViT / DeiT / Swin in full precision (``eamvit.create_model``), or any module
            that contains supported attention (every Linear and Conv2d in it is quantized, a timm
            classifier's head only with ``quantize_head``).
        config: a ``RepQConfig``, ``ADFQConfig`` or ``PMQConfig``.
        calib: calibration images (:func:`~.quant_registry.calibration_batches`), preprocessed as for evaluation.
        forward_loop: instead of ``calib``: ``f(model)`` runs ``model`` over the calibration data
            (RepQ-ViT calibrates on the first forward it runs: make that ``calib_size`` images).
        device: move the model there first (None: where it is).
        checkpoint_dir: resumable per-module checkpoints (ADFQ-ViT's reconstruction).
    """
    handler = _handler(config)
    check_forward_loop(calib, forward_loop, "calib")
    if forward_loop is not None and not handler.forward_loop:
        raise EamError(f"{type(config).__name__} cannot calibrate from forward_loop (it needs the calibration images "
                       "themselves); give calib images, or use RepQConfig")
    require(attention_layers(model), type(config).KIND)  # families whose adapters have no quantizer hooks
    if step_config(model, "quant") is not None or find_quantizers(model):
        raise EamError("the model is already quantized; quantize a fresh full-precision model")
    # What the state is made from: loading it onto other weights is refused (load_quantized).
    state_of(model).fp_sha256 = tensors_sha256(model.state_dict())
    if device is not None:
        model.to(device)
    model.eval()
    run = QuantRun(progress=progress, checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                   forward_loop=forward_loop)
    t0 = time.perf_counter()
    report = handler.quantize(model, config, calib, run)
    state_of(model).steps["quant"] = config
    state_of(model).reports["quant"] = {**report, "calib_seconds": time.perf_counter() - t0}
    add_calibration(model, [calibration_record(calib)])
    return model


def _pack(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Replace each packable ``<name>.weight`` in ``tensors`` by ``<name>.weight.codes``: those of enabled
    uniform quantizers with an integer zero point, whose codes give the fake-quantized weights back exactly."""
    packed = {}
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if (not isinstance(wq, UniformQuantizer) or not wq.enabled or not wq.inited
                or not isinstance(getattr(m, "weight", None), torch.Tensor)
                or not torch.equal(wq.zero_point, torch.round(wq.zero_point))):
            continue
        key = f"{name}.weight"
        with torch.no_grad():
            codes = wq.codes(m.weight.detach())
        tensors.pop(key)
        tensors[key + _CODES] = pack_bits(codes, wq.bits).cpu()
        packed[key] = {"bits": wq.bits, "shape": list(m.weight.shape)}
    return packed


def quantized_content(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a quantized model's state (any method): what :func:`save_quantized` writes."""
    config = step_config(model, "quant")
    if config is None:
        raise EamError("the model is not quantized; run quantize_ (eamvit quantize) first")
    if not state_of(model).fp_sha256:
        raise EamError("the model was not quantized by quantize_ or load_quantized; quantize it with quantize_")
    missing = [n for n, q in model.named_modules() if isinstance(q, Quantizer) and not q.inited]
    if missing:
        raise EamError(f"{len(missing)} quantizer(s) were never calibrated (e.g. {missing[0]}); "
                       "calibrate with quantize_ before saving")
    handler = _handler(config)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    packed = _pack(model, tensors)
    meta = {"format": FORMAT, "method": config.KIND, "model": model_spec(model).to_dict(),
            "config": config.to_dict(), "structure": handler.structure(model),
            "quantizers": {n: {"bits": q.bits, "granularity": q.granularity} for n, q in model.named_modules()
                           if isinstance(q, Quantizer)},
            "packed": packed, "fp_sha256": state_of(model).fp_sha256,
            # The deployment target whose quantizers it was given (absent: as its method calibrates them).
            **({"target": state_of(model).target.to_dict()} if state_of(model).target is not None else {}),
            # The preprocessing the state was calibrated with: eamvit uses it again when reading the state.
            "data_config": preprocessing(data_config(model)),
            # The images it was calibrated with: evaluation of the state never scores them.
            "calibration": list(state_of(model).calibration or [])}
    return tensors, meta


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save a quantized model's state (any method) to ``path`` (safetensors, written atomically)."""
    save_tensors(path, *quantized_content(model))
    return Path(path)


def _misfit(path: Any, what: str) -> EamError:
    return EamError(f"quantized state {path} does not fit this model ({what}); quantize it again with `eamvit quantize`")


def _inconsistent(path: Any, what: str) -> EamError:
    return EamError(f"quantized state {path} is inconsistent ({what}); quantize the model again with `eamvit quantize`")


def _check_fp_weights(model: nn.Module, meta: dict, path: Any) -> None:
    """Refuse a state made from other full-precision weights than ``model``'s, whatever its spec says."""
    theirs, ours = meta.get("fp_sha256"), tensors_sha256(model.state_dict())
    if not isinstance(theirs, str):
        raise _inconsistent(path, "no digest of the weights it was made from")
    if theirs != ours:
        raise EamError(f"quantized state {path} was made from other weights than this model's (weights digest "
                       f"{theirs[:12]}, this model {ours[:12]}); quantize this model with `eamvit quantize`")
    state_of(model).fp_sha256 = ours


def _apply_attrs(model: nn.Module, attrs: Any, free: dict[str, tuple[int, ...]], config: Any, path: Any) -> None:
    """Give the rebuilt quantizers the stored bits and granularity once they agree with the config."""
    own = {n: q for n, q in model.named_modules() if isinstance(q, Quantizer)}
    if not isinstance(attrs, dict) or set(attrs) != set(own):
        extra = sorted(set(own) ^ set(attrs if isinstance(attrs, dict) else {}))
        raise _misfit(path, f"quantizers differ, e.g. {extra[0] if extra else '?'}")
    for name, a in attrs.items():
        bits, gran = (a.get("bits"), a.get("granularity")) if isinstance(a, dict) else (None, None)
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise _inconsistent(path, f"{name} has {bits!r} bits, not {MIN_BITS}..{MAX_BITS}")
        if bits != own[name].bits and bits not in free.get(name, ()):
            raise _inconsistent(path, f"{name} has {bits} bits but its config (w_bits={config.w_bits}, "
                                      f"a_bits={config.a_bits}) gives it {own[name].bits}")
        if gran != own[name].granularity:
            raise _inconsistent(path, f"{name} is {gran!r}-wise but its config makes it {own[name].granularity!r}-wise")
        own[name].bits = bits


def _unpack(model: nn.Module, tensors: dict[str, torch.Tensor], packed: Any, path: Any) -> None:
    """Turn each ``<name>.weight.codes`` of ``tensors`` back into ``<name>.weight``."""
    if not isinstance(packed, dict):
        raise _misfit(path, "no packing table")
    for key, info in packed.items():
        name = key[: -len(".weight")]
        try:
            module = model.get_submodule(name)
            bits, shape = int(info["bits"]), tuple(int(s) for s in info["shape"])
            codes = tensors.pop(key + _CODES)
            delta = tensors[f"{name}.weight_quantizer.delta"]
            zp = tensors[f"{name}.weight_quantizer.zero_point"]
        except (AttributeError, KeyError, TypeError, ValueError):
            raise _misfit(path, f"packed weight {key} has no place or no step / zero point") from None
        if tuple(module.weight.shape) != shape or codes.numel() != packed_size(module.weight.numel(), bits):
            raise _misfit(path, f"shape mismatch at {key}")
        if bits != getattr(getattr(module, "weight_quantizer", None), "bits", None):
            raise _inconsistent(path, f"{key} is packed at {bits} bits, its quantizer has "
                                      f"{getattr(getattr(module, 'weight_quantizer', None), 'bits', None)}")
        q = unpack_bits(codes, bits, module.weight.numel()).reshape(shape)
        view = (-1,) + (1,) * (len(shape) - 1) if delta.dim() == 1 else ()
        tensors[key] = uniform_dequant(q, delta.reshape(view), zp.reshape(view))


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Any) -> None:
    """Refuse tensors that do not fit the model, and what no calibration writes (non-finite values, steps ≤ 0)."""
    own = model.state_dict()
    own_keys = set(own) | {n + "." + p for n, q in model.named_modules() if isinstance(q, Quantizer)
                           for p in q._param_names}
    missing = sorted(own_keys - set(tensors))
    unexpected = sorted(set(tensors) - own_keys)
    shapes = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or shapes:
        raise _misfit(path, f"{len(missing)} missing, e.g. {missing[0]}" if missing else
                      f"{len(unexpected)} unexpected, e.g. {unexpected[0]}" if unexpected else
                      f"shape mismatch at {shapes[0]}")
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise _inconsistent(path, f"{key} holds non-finite values")
        if key.endswith(".delta") and bool((value <= 0).any()):
            raise _inconsistent(path, f"quantizer step {key} is not positive")


def read_quantized(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a quantized-state file, or a clear :class:`EamError`."""
    return load_tensors(path, FORMAT, "quantized state", "make one with `eamvit quantize`")


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Quantize a fresh full-precision ``model`` (the one the state was made for: name, kwargs, checkpoint)
    from a state saved by :func:`save_quantized`; its logits then equal those of the model that was saved."""
    return restore_quantized(model, *read_quantized(path), path)


def restore_quantized(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                      path: Any) -> nn.Module:
    """Quantize a fresh full-precision ``model`` from :func:`quantized_content`'s ``tensors`` (consumed: packed
    codes are replaced by weights) and ``meta``; ``path`` names the file in messages."""
    check_same_model(model, meta.get("model"), f"quantized state {path} was made",
                     "quantize this model with `eamvit quantize`")
    if step_config(model, "quant") is not None or find_quantizers(model):
        raise EamError("the model is already quantized; load the state into a fresh full-precision model")
    _check_fp_weights(model, meta, path)
    config = config_type(meta.get("method")).from_dict(meta.get("config", {}))
    handler = _handler(config)
    handler.rebuild(model, config, meta.get("structure") or {})
    target = None
    if meta.get("target") is not None:  # the deployment target whose quantizers the state was given
        try:
            target = Target.from_dict(meta["target"])
        except EamError as e:
            raise _inconsistent(path, f"its target: {e}") from None
        shape_for_target_(model, target)
    _apply_attrs(model, meta.get("quantizers"), handler.free_bits(model, config), config, path)
    _unpack(model, tensors, meta.get("packed"), path)
    _check_tensors(model, tensors, path)
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=True)
    state_of(model).steps["quant"] = config
    state_of(model).target = target
    if meta.get("calibration") is not None:  # states written before eamvit recorded them have none
        add_calibration(model, meta["calibration"], f"quantized state {path}")
    return model


def _apply_step(model: nn.Module, config: Config, inputs: StepInputs) -> dict:
    quantize_(model, config, inputs.calib, device=inputs.device, progress=inputs.progress,
              checkpoint_dir=inputs.checkpoint_dir)
    apply_target_(model, inputs.target)  # from here on every step sees the quantizers that are shipped
    return state_of(model).reports["quant"]


def _restore_step(model: nn.Module, config: Config, meta: dict, tensors: dict, path: str) -> None:
    if meta.get("config") != config.to_dict():
        raise EamError(f"{path}: its recipe's quantization step ({config.to_json()}) is not the one its quantized "
                       "state was made with; the file was edited: compress the model again with `eamvit compress`")
    restore_quantized(model, meta, tensors, path)


def _export_step(model: nn.Module, config: Config, export_config: Any) -> None:
    if not isinstance(config, repq.RepQConfig):
        raise EamError(f"ONNX export supports RepQ-ViT models; this one is quantized with {type(config).__name__}, "
                       "whose quantizers have no integer-runtime form")


def _handler(config: Any) -> QuantizeHandler:
    """The quantization method of ``config``'s type: the ``"quant"`` step's entry in the step table."""
    if not isinstance(config, tuple(step_types("quant"))):
        raise EamError(f"no quantization method is registered for {type(config).__name__}; "
                       "pass a RepQConfig, ADFQConfig or PMQConfig")
    return handler_of(config).method


for _method in (repq.HANDLER, adfq.HANDLER, pmq.HANDLER):  # each the one quantization stage of a recipe
    register_step(_method.config, StepHandler(stage="quant", order=10, apply=_apply_step, restore=_restore_step,
                                              content=lambda model, config: quantized_content(model),
                                              export=_export_step, method=_method))
