"""Running eamvit's ONNX exports in ONNX Runtime: reading the file, a PyTorch-shaped classifier, timing."""
from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from eamvit.errors import EamError

FORMAT = "eamvit-onnx/1"


def read_onnx_meta(path: str | os.PathLike) -> dict[str, Any]:
    """eamvit's metadata of an exported ``.onnx`` file (model, data config, export settings)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise EamError(f"ONNX model {p} does not exist; write one with `eamvit export --format onnx --out {p}`")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises several types for bytes that are not a model
        raise EamError(f"{p} is not an ONNX model ({type(e).__name__}); pass a file written by `eamvit export`") from None
    props = {e.key: e.value for e in proto.metadata_props}
    try:
        meta = json.loads(props["eamvit"])
    except (KeyError, ValueError):
        raise EamError(f"{p} has no eamvit metadata (preprocessing, model); export it with `eamvit export`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EamError(f"{p} was written by an unknown eamvit export format; export it again with `eamvit export`")
    return meta


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when empty), at most 300 characters, for an EamError."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """A baseline tool's run without its console output: stdout dropped, ``loggers`` below ERROR (restored after)."""
    logs = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in logs]
    for lg in logs:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(logs, levels):
            lg.setLevel(level)


def cpu_has_vnni() -> Optional[bool]:
    """Whether this x86 CPU has VNNI (AVX-512 VNNI, AVX-VNNI or AMX), without which ONNX Runtime's uint8 × int8
    kernels saturate; ``None`` where ``/proc/cpuinfo`` cannot say (other systems and architectures)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return None if flags is None else any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def saturation_warning(meta: dict[str, Any]) -> Optional[str]:
    """A one-line warning, for a run in ONNX Runtime, when ``meta`` describes a QDQ export with int8 weights and
    this CPU lacks VNNI (``ExportConfig.weight_storage``)."""
    export = meta.get("export") or {}
    if (not meta.get("quant") or export.get("scheme") != "qdq" or export.get("weight_storage") == "uint8"
            or cpu_has_vnni() is not False):
        return None
    remedy = ("it was written for OpenVINO: run it with --runtime openvino" if export.get("runtime") == "openvino"
              else "export it with --weight-storage uint8 (the same numbers, exact u8·u8 kernels)")
    return ("this CPU has no VNNI: ONNX Runtime's u8·s8 kernels add pairs of products in 16 bits and saturate here, "
            f"so this export's top-1 can differ from its simulation; {remedy}")


def onnx_session(path: str | os.PathLike, threads: Optional[int] = None, optimized_path: Optional[str] = None,
                 optimize: bool = True):
    """An ONNX Runtime CPU session.

    Args:
        threads: intra-op threads (ONNX Runtime's default, one per core, when ``None``).
        optimized_path: also write the optimised graph there (to check which kernels were fused).
        optimize: all graph optimisations (fused int8 kernels, the deployed speed); ``False`` runs every
            node as written (QuantizeLinear, DequantizeLinear, float MatMul): the graph's exact meaning.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3  # the optimised-model note about hardware-specific kernels is expected
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise EamError(f"ONNX Runtime cannot load {path}: {first_line(e)}") from None


class OnnxClassifier(nn.Module):
    """An ``.onnx`` export run by ONNX Runtime, called like the PyTorch model (images → logits)."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None):
        super().__init__()
        self.meta = read_onnx_meta(path)
        self.session = onnx_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.path = str(path)

    @property
    def input_dims(self) -> list:
        """The graph's input dimensions after the batch: ints, or strings for dynamic ones."""
        return list(self.session.get_inputs()[0].shape[1:])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: x})[0])


def optimized_ops(path: str | os.PathLike, threads: Optional[int] = None) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime runs after its optimisations (fusions show here)."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "optimized.onnx"
        onnx_session(path, threads, optimized_path=str(out))
        proto = onnx.load(str(out))
    return dict(collections.Counter(n.op_type for n in proto.graph.node))


ORT_CALIBRATION = ("minmax", "percentile")


def ort_quantize_static(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calib_images: torch.Tensor,
                        method: str = "minmax") -> None:
    """ONNX Runtime's own ``quantize_static`` of an fp32 export as its documentation recommends for CPU (the baseline
    eamvit's int8 export meets), calibrated by ``"minmax"`` or ``"percentile"`` (ONNX Runtime's default 99.999th)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in ORT_CALIBRATION:
        raise EamError(f"ONNX Runtime calibration {method!r} is not one of {', '.join(ORT_CALIBRATION)}")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = ({"images": calib_images[i:i + 32].numpy()} for i in range(0, len(calib_images), 32))

        def get_next(self):
            return next(self.it, None)

    calib = CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Percentile
    # The root logger: its advice to pre-process is followed; its progress prints are noise.
    with tempfile.TemporaryDirectory() as d, quiet(""):
        src = str(Path(d) / "pre.onnx")  # shape inference and graph optimisation first, as ONNX Runtime advises
        quant_pre_process(str(fp32_path), src)
        quantize_static(src, str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calib,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv"])
