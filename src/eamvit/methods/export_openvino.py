"""Running eamvit's exports in OpenVINO (an optional extra), and NNCF's int8 quantization of an fp32 export,
the baseline (docs/architecture-quant-export.md)."""
from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from eamvit.errors import EamError
from eamvit.methods.export_runtime import first_line, quiet, read_onnx_meta

INSTALL = 'pip install "eamvit[openvino]"'
PRECISIONS = ("f32", "bf16")
_META_KEY = "eamvit"  # the IR's rt_info entry holding eamvit's metadata (JSON), as the ONNX file's metadata_props


def is_available(nncf: bool = False) -> bool:
    """Whether OpenVINO (and NNCF) can be imported."""
    try:
        require_openvino("", nncf)
    except EamError:
        return False
    return True


def require_openvino(what: str, nncf: bool = False) -> None:
    """One :class:`EamError` naming the extra to install when OpenVINO (and NNCF) cannot be imported; ``what``
    names what needs them (e.g. ``"eval --runtime openvino"``)."""
    for name in ("openvino",) + (("nncf",) if nncf else ()):
        try:
            importlib.import_module(name)
        except ImportError:
            raise EamError(f"{what} needs {'OpenVINO and NNCF' if nncf else 'OpenVINO'}, which cannot be imported; "
                           f"install them with `{INSTALL}`") from None


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of an exported model: the ``.onnx`` file, or an IR's ``.xml`` and ``.bin`` together."""
    p = Path(path)
    return p.stat().st_size + (p.with_suffix(".bin").stat().st_size if p.suffix == ".xml" else 0)


@functools.lru_cache(maxsize=None)
def _core():
    """The process's one OpenVINO ``Core``: compiled models never outlive the Core that made them."""
    import openvino as ov

    return ov.Core()


def read_model_meta(path: str | os.PathLike) -> dict[str, Any]:
    """eamvit's metadata of an ``.onnx`` export or of an OpenVINO IR (``.xml``) from :func:`nncf_quantize`."""
    p = Path(path)
    if p.suffix != ".xml":
        return read_onnx_meta(p)
    require_openvino(f"reading {p}")
    if not p.is_file() or not p.with_suffix(".bin").is_file():
        raise EamError(f"OpenVINO model {p} (with {p.with_suffix('.bin').name}) does not exist")
    try:
        model = _core().read_model(str(p))
    except Exception as e:
        raise EamError(f"OpenVINO cannot read {p}: {first_line(e)}") from None
    if not model.has_rt_info(_META_KEY):
        raise EamError(f"{p} has no eamvit metadata (preprocessing, model); quantize it with eamvit's nncf_quantize")
    return json.loads(model.get_rt_info(_META_KEY).astype(str))


def compile_openvino(path: str | os.PathLike, threads: Optional[int] = None, precision: Optional[str] = None):
    """An OpenVINO ``CompiledModel`` of an ``.onnx`` export or an IR ``.xml`` for the CPU, tuned for latency.

    Args:
        threads: inference threads (OpenVINO's default, one per core, when ``None``).
        precision: ``"f32"`` or ``"bf16"`` for the float parts; ``None``: OpenVINO's choice for this CPU.
    """
    require_openvino("running a model in OpenVINO")
    if precision is not None and precision not in PRECISIONS:
        raise EamError(f"OpenVINO precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    cfg = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {}),
           **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}
    try:
        return _core().compile_model(str(path), "CPU", cfg)
    except Exception as e:
        raise EamError(f"OpenVINO cannot load {path}: {first_line(e)}") from None


class OpenVinoClassifier(nn.Module):
    """An ``.onnx`` export or an IR ``.xml`` from :func:`nncf_quantize` run by OpenVINO on CPU, called like the
    PyTorch model (images → logits); ``threads`` and ``precision``: see :func:`compile_openvino`."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None, precision: Optional[str] = None):
        super().__init__()
        self.meta = read_model_meta(path)
        self.compiled = compile_openvino(path, threads, precision)
        self.request = self.compiled.create_infer_request()
        self.path = str(path)

    @property
    def input_dims(self) -> list:
        """The graph's input dimensions after the batch: ints, or strings for dynamic ones."""
        return [d.get_length() if d.is_static else "?" for d in self.compiled.input(0).get_partial_shape()][1:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.request.infer({0: x})
        return torch.from_numpy(out[self.compiled.output(0)].copy())


NNCF_PRESETS = ("performance", "mixed")


def nncf_quantize(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calib_images: torch.Tensor,
                  preset: Optional[str] = None, calibration: Sequence[dict] = ()) -> dict[str, Any]:
    """NNCF's ``nncf.quantize`` (``model_type=TRANSFORMER``) of an fp32 export into an f32 OpenVINO IR, the
    baseline (docs/architecture-quant-export.md); returns the metadata written into the IR.

    Args:
        out_path: the IR to write (``.xml``; the weights go to the ``.bin`` beside it).
        calib_images: calibration images ``(N, C, H, W)``, one NNCF sample each; NNCF uses all ``N``.
        preset: ``"performance"`` (symmetric activations) or ``"mixed"``; ``None``: NNCF's default for
            transformers.
        calibration: records of the calibration images (:func:`eamvit.methods.data.calibration_record`),
            stored so that evaluation skips them.
    """
    require_openvino("NNCF quantization", nncf=True)
    import openvino as ov

    out = Path(out_path)
    if out.suffix != ".xml":
        raise EamError(f"NNCF writes an OpenVINO IR: give an .xml path, not {out.name}")
    if preset is not None and preset not in NNCF_PRESETS:
        raise EamError(f"NNCF preset {preset!r} is not one of {', '.join(NNCF_PRESETS)}")
    if calib_images.dim() != 4 or len(calib_images) < 1:
        raise EamError(f"NNCF calibration needs images (N, C, H, W), got shape {tuple(calib_images.shape)}")
    meta = read_onnx_meta(fp32_path)
    if meta.get("quant"):
        raise EamError(f"{fp32_path} is already quantized; NNCF quantizes an fp32 export")
    quantized, version = _run_nncf(fp32_path, calib_images, preset)
    meta = {**meta, "quant": {"method": "nncf", "nncf_version": version, "preset": preset,
                              "model_type": "transformer", "subset_size": len(calib_images)},
            "export": {"scheme": "nncf", "runtime": "openvino"},
            "calibration": list(meta.get("calibration") or []) + list(calibration)}
    quantized.set_rt_info(json.dumps(meta), _META_KEY)
    out.parent.mkdir(parents=True, exist_ok=True)  # the IR in full precision, each file replaced whole
    tmp_xml = out.with_name(out.stem + ".partial.xml")
    ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
    os.replace(tmp_xml.with_suffix(".bin"), out.with_suffix(".bin"))
    os.replace(tmp_xml, out)
    return meta


def _run_nncf(fp32_path: str | os.PathLike, calib_images: torch.Tensor, preset: Optional[str]):
    """``(nncf.quantize's OpenVINO model, NNCF's version)``, without NNCF's console output."""
    import nncf

    model = _core().read_model(str(fp32_path))
    data = nncf.Dataset([calib_images[i:i + 1].detach().cpu().float().numpy() for i in range(len(calib_images))])
    kwargs: dict[str, Any] = dict(model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib_images))
    selection = selection_products(model)
    if selection:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=selection)
    if preset is not None:
        kwargs["preset"] = nncf.QuantizationPreset(preset)
    # NNCF's steps draw progress bars on stdout and log each node its ignored scope skips, and its backend
    # probe imports torch's C++ extension module, which logs a CUDA note: none of it is eamvit's output.
    try:
        with quiet("torch.utils.cpp_extension", "nncf"):
            return nncf.quantize(model, data, **kwargs), nncf.__version__
    except Exception as e:  # a graph NNCF cannot handle: one line, so a search records it and goes on
        raise EamError(f"NNCF cannot quantize {fp32_path}: {first_line(e)}") from None


def selection_products(model) -> list[str]:
    """Names of the MatMuls of an ``openvino.Model`` whose results reach its outputs only through integer
    indices (token pruning's and merging's scores), which NNCF leaves in float (docs/architecture-quant-export.md)."""
    carries: set = set()  # nodes whose float results flow to an output
    todo = list(model.get_results())
    while todo:
        node = todo.pop()
        if node.get_friendly_name() in carries:
            continue
        carries.add(node.get_friendly_name())
        for value in node.input_values():
            if value.get_element_type().is_real():
                todo.append(value.get_node())
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() == "MatMul" and op.get_friendly_name() not in carries]
