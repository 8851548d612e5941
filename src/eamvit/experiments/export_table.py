"""The demo's deployment table on the digits model: PyTorch, eamvit's exports, ONNX Runtime's own int8 and
(where installed) OpenVINO. The rows: ``docs/architecture-experiments.md``, "export_table".
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from eamvit.experiments.results import Column, ResultRow
from eamvit.experiments.runner import Throughput, result_row
from eamvit.io import save_tensors
from eamvit.methods.data import build_splits, digits_data_config
from eamvit.methods.export import ExportConfig, Target, export_onnx, prepare_export_
from eamvit.experiments.timer import Stats, time_calls
from eamvit.methods.export_openvino import OpenVinoClassifier, is_available, model_bytes, nncf_quantize
from eamvit.methods.export_runtime import onnx_session, ort_quantize_static
from eamvit.methods.models import data_config
from eamvit.methods.quantize import quantize_, save_quantized
from eamvit.methods.repq import RepQConfig


def _row(model: nn.Module, label: str, runtime: str, predict: Callable[[], torch.Tensor], targets: torch.Tensor,
         path: Path, reps: int) -> ResultRow:
    logits = predict()
    hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.eq(targets.unsqueeze(1))
    top1, top5 = hit[:, 0].float().mean().item() * 100, hit.any(1).float().mean().item() * 100
    metrics = {"top1": round(top1, 3), "top1_err": round(100 - top1, 3), "top5": round(top5, 3),
               "top5_err": round(100 - top5, 3), "num_images": len(targets), "skipped_images": 0}
    t = Stats.of(time_calls([predict], warmup=1, reps=reps)[0])
    n = len(targets)  # one call scores the whole test set
    speed = Throughput(median=n / t.median, p25=n / t.p75, p75=n / t.p25, reps=reps)
    cfg = {**digits_data_config(int(model.patch_embed.img_size[-1])), "source": "digits"}
    return result_row(model, [metrics], {"label": label, "runtime": runtime, "file_bytes": model_bytes(path)},
                      cfg, speed)


def export_table(model: nn.Module, calib_size: int = 32, reps: int = 7, threads: Optional[int] = None,
                 workdir: Optional[str] = None, short: bool = False, progress: bool = False,
                 openvino: Optional[bool] = None) -> list[ResultRow]:
    """Top-1, file size (``file_bytes``) and images/s of the digits model per configuration (``label``) and
    ``runtime``, fp32 to 4-bit.

    Args:
        model: the trained digits ViT (not changed).
        calib_size: calibration images, shared by RepQ-ViT and ONNX Runtime's ``quantize_static``.
        threads: PyTorch and ONNX Runtime threads (default: PyTorch's current setting).
        workdir: where the files go (a temporary folder by default).
        short: only the fp32 and eamvit W8/A8 rows (no OpenVINO unless ``openvino`` asks for it).
        openvino: the OpenVINO rows; ``None``: when OpenVINO and NNCF are installed and the table is not ``short``.
    """
    threads = threads or torch.get_num_threads()
    if openvino is None:
        openvino = not short and is_available(nncf=True)
    # The one split rule: a seeded subset of the training digits calibrates, every test digit is scored.
    sp = build_splits("digits", data_config(model), calib_size=calib_size, seed=0)
    calib = torch.stack([sp.calib_set[i][0] for i in sp.calib_indices])
    x, y = sp.eval_set.images, sp.eval_set.targets
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(workdir or tmp)
        with tqdm(total=2 * (4 if short else 7) + (5 if openvino else 0), desc="export table", unit="step",
                  disable=not progress, dynamic_ncols=True) as bar:
            return _table(model.cpu().eval(), calib, x, y, d, reps, threads, short, openvino, bar)


def _call(runtime: str, path: Path, model: Optional[nn.Module], x: torch.Tensor,
          threads: int) -> Callable[[], torch.Tensor]:
    """The logits of ``x`` from ``model`` in PyTorch, or from the file ``path`` in ONNX Runtime or OpenVINO."""
    if runtime == "PyTorch":
        def call() -> torch.Tensor:
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    return model(x)
            finally:
                torch.set_num_threads(old)
        return call
    if runtime == "OpenVINO":
        clf = OpenVinoClassifier(path, threads)
        return lambda: clf(x)
    s, xn = onnx_session(path, threads), x.numpy()
    return lambda: torch.from_numpy(s.run(None, {"images": xn})[0])


def _table(model: nn.Module, calib: torch.Tensor, x: torch.Tensor, y: torch.Tensor, d: Path, reps: int,
           threads: int, short: bool, openvino: bool, bar: tqdm) -> list[ResultRow]:
    """The rows; ``bar`` advances by one per model built and per row timed."""
    save_tensors(d / "fp32.safetensors", {k: v.detach().clone() for k, v in model.state_dict().items()}, {})
    bar.update(1)
    export_onnx(model, d / "fp32.onnx")
    bar.update(1)
    q8 = quantize_(copy.deepcopy(model), RepQConfig(w_bits=8, a_bits=8, calib_size=len(calib)), calib,
                   progress=False)
    save_quantized(q8, d / "w8a8.safetensors")
    bar.update(1)
    export_onnx(q8, d / "w8a8.onnx")
    sim8 = prepare_export_(copy.deepcopy(q8), ExportConfig())
    bar.update(1)
    specs = [("fp32", "PyTorch", d / "fp32.safetensors", model), ("fp32", "ONNX Runtime", d / "fp32.onnx", None),
             ("eamvit RepQ-ViT W8/A8 (simulated)", "PyTorch", d / "w8a8.safetensors", sim8),
             ("eamvit RepQ-ViT W8/A8 (QDQ export)", "ONNX Runtime", d / "w8a8.onnx", None)]
    if not short:
        specs += _other_specs(model, calib, d, bar)
    if openvino:
        specs += _openvino_specs(q8, calib, d, bar)
    rows = []
    for name, rt, path, m in specs:
        rows.append(_row(model, name, rt, _call(rt, path, m, x, threads), y, path, reps))
        bar.update(1)
    return rows


def _other_specs(model: nn.Module, calib: torch.Tensor, d: Path, bar: tqdm) -> list[tuple[str, str, Path, None]]:
    """The rows beyond the short table: ONNX Runtime's own static int8 and eamvit's 4-bit weights."""
    q4 = quantize_(copy.deepcopy(model), RepQConfig(w_bits=4, a_bits=8, calib_size=len(calib)), calib,
                   progress=False)
    export_onnx(q4, d / "w4.onnx", ExportConfig(scheme="weight-only"))
    bar.update(1)
    for method in ("minmax", "percentile"):
        ort_quantize_static(d / "fp32.onnx", d / f"ort_{method}.onnx", calib, method=method)
        bar.update(1)
    return [("ORT quantize_static W8/A8 MinMax", "ONNX Runtime", d / "ort_minmax.onnx", None),
            ("ORT quantize_static W8/A8 percentile", "ONNX Runtime", d / "ort_percentile.onnx", None),
            ("eamvit RepQ-ViT W4 weight-only (MatMulNBits)", "ONNX Runtime", d / "w4.onnx", None)]


def _openvino_specs(q8: nn.Module, calib: torch.Tensor, d: Path, bar: tqdm) -> list[tuple[str, str, Path, None]]:
    """OpenVINO's rows: the fp32 export, eamvit's W8/A8 exported for it, and NNCF's int8 of the fp32 export."""
    export_onnx(q8, d / "w8a8_openvino.onnx", Target(form="openvino").export_config())
    bar.update(1)
    nncf_quantize(d / "fp32.onnx", d / "nncf.xml", calib)
    bar.update(1)
    return [("fp32", "OpenVINO", d / "fp32.onnx", None),
            ("eamvit RepQ-ViT W8/A8 (QDQ export for OpenVINO, symmetric)", "OpenVINO", d / "w8a8_openvino.onnx", None),
            ("NNCF int8 (nncf.quantize, TRANSFORMER)", "OpenVINO", d / "nncf.xml", None)]


EXPORT_COLUMNS = [Column("label", "model"), Column("runtime", "runtime"), Column("top1", "top-1 (%)", ".2f"),
                  Column("file_bytes", "file bytes", ","), Column("images_per_s", "images/s", ",.0f"),
                  Column("images_per_s_p25", "p25", ",.0f"), Column("images_per_s_p75", "p75", ",.0f")]
