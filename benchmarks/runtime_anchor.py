"""eamvit's int8 against what a CPU user would pick instead: NNCF's int8 run by OpenVINO.

deit_small_patch16_224, random weights, 224 px, batch 32, 2 threads, all in one process. Rows:
ONNX Runtime fp32 and OpenVINO fp32 (eamvit's fp32 export); eamvit's RepQ-ViT W8/A8 in ONNX Runtime
(the default graph form, RepQ-ViT's asymmetric weights and activations) and in OpenVINO (the
``"openvino"`` form with symmetric weights and activations, :class:`~eamvit.methods.export.Target` ``"openvino"``); NNCF's
``nncf.quantize`` (TRANSFORMER) of the fp32 export, in OpenVINO; and eamvit's W8/A8 with EViT token
pruning at κ = 0.7 (blocks 4, 7, 10) in both runtimes. RepQ-ViT and NNCF calibrate on the same
``--calib-size`` random images. Each row prints its cosine to the PyTorch fp32 logits of the timing
batch (mean over the images).

Timing: eamvit's one timer (:mod:`eamvit.experiments.timer`), one warm-up call each, then
``--rounds`` interleaved rounds; each row reports the median and spread ((max − min)/median) of its
rounds, and each ratio is the median of the per-round ratios (paired, so drift of the machine
cancels). "eamvit best" is the faster of eamvit's two int8 rows (its best runtime), likewise with
pruning. The 1-minute load average is printed before and after (other sessions share this CPU).
``--workdir`` keeps the built files and reuses them on the next run. The last line prints eamvit best
÷ NNCF in OpenVINO (goal ≥ 1.0) and with pruning (goal ≥ 1.4).

    python benchmarks/runtime_anchor.py [--rounds 5] [--calib-size 16] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch

from eamvit import create_model
from eamvit.experiments.timer import Stats, ratio_stats, time_calls
from eamvit.methods.export import ExportConfig, Target, export_onnx
from eamvit.methods.export_openvino import OpenVinoClassifier, nncf_quantize, require_openvino
from eamvit.methods.export_runtime import OnnxClassifier
from eamvit.methods.prune import PruneConfig, prune_
from eamvit.methods.quantize import quantize_
from eamvit.methods.repq import RepQConfig

MODEL = "deit_small_patch16_224"
# name -> (file, runtime); the eamvit int8 files are built from one calibration
ROWS = {
    "ORT fp32": ("fp32.onnx", "ort"),
    "OpenVINO fp32": ("fp32.onnx", "ov"),
    "eamvit int8, ORT": ("int8_ort.onnx", "ort"),
    "eamvit int8, OpenVINO": ("int8_ov.onnx", "ov"),
    "NNCF int8, OpenVINO": ("nncf.xml", "ov"),
    "eamvit int8 + pruning, ORT": ("int8_pruned_ort.onnx", "ort"),
    "eamvit int8 + pruning, OpenVINO": ("int8_pruned_ov.onnx", "ov"),
}


def build(d: Path, args) -> None:
    """Write every file of :data:`ROWS` into ``d`` (files already there are kept)."""
    if all((d / f).is_file() for f, _ in ROWS.values()):
        print(f"reusing the files in {d}")
        return
    torch.manual_seed(0)
    model = create_model(MODEL)  # random weights
    calib = torch.randn(args.calib_size, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    export_onnx(model, d / "fp32.onnx")
    nncf_quantize(d / "fp32.onnx", d / "nncf.xml", calib)
    q = quantize_(copy.deepcopy(model), RepQConfig(w_bits=8, a_bits=8, calib_size=args.calib_size), calib,
                  progress=False)
    export_onnx(q, d / "int8_ort.onnx", ExportConfig())
    export_onnx(q, d / "int8_ov.onnx", Target(form="openvino").export_config())
    prune_(q, PruneConfig(method="evit", keep_rate=args.keep_rate, blocks=(3, 6, 9)))
    export_onnx(q, d / "int8_pruned_ort.onnx", ExportConfig())
    export_onnx(q, d / "int8_pruned_ov.onnx", Target(form="openvino").export_config())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-size", type=int, default=16)
    ap.add_argument("--keep-rate", type=float, default=0.7)
    ap.add_argument("--workdir", default=None, help="keep the built files here and reuse them")
    args = ap.parse_args()
    require_openvino("benchmarks/runtime_anchor.py", nncf=True)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        d = Path(args.workdir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        build(d, args)
        x = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(0)
        ref = create_model(MODEL)(x)  # the same random weights as the exports
        models = {n: (OnnxClassifier if rt == "ort" else OpenVinoClassifier)(d / f, threads=args.threads)
                  for n, (f, rt) in ROWS.items()}
        cosine = {n: torch.nn.functional.cosine_similarity(m(x), ref).mean().item() for n, m in models.items()}
        calls = [(lambda m: lambda: m(x))(m) for m in models.values()]
        times = dict(zip(models, time_calls(calls, warmup=1, reps=args.rounds)))
    load1 = os.getloadavg()[0]
    stats = {n: Stats.of(t) for n, t in times.items()}

    def over(ref_name: str, n: str) -> float:  # speed of n ÷ speed of ref_name, paired by round
        return ratio_stats(times[ref_name], times[n]).median

    print(f"{MODEL} (random weights), batch {args.batch_size}, 224 px, {args.threads} threads, median of "
          f"{args.rounds} interleaved rounds; load average (1 min) {load0:.1f} before, {load1:.1f} after "
          f"on {os.cpu_count()} CPUs")
    for n, s in stats.items():
        print(f"  {n:33s} {args.batch_size / s.median:6.1f} images/s  spread {s.spread:5.1%}  "
              f"÷ ORT fp32 {over('ORT fp32', n):.2f}  ÷ NNCF {over('NNCF int8, OpenVINO', n):.2f}  "
              f"cosine to fp32 {cosine[n]:.4f}")
    best = min(("eamvit int8, ORT", "eamvit int8, OpenVINO"), key=lambda n: stats[n].median)
    pruned = min(("eamvit int8 + pruning, ORT", "eamvit int8 + pruning, OpenVINO"), key=lambda n: stats[n].median)
    print(f"eamvit best int8: {best}; with pruning: {pruned}")
    print(f"eamvit best ÷ NNCF OpenVINO {over('NNCF int8, OpenVINO', best):.3f} (goal ≥ 1.0), "
          f"with pruning κ {args.keep_rate:g} {over('NNCF int8, OpenVINO', pruned):.3f} (goal ≥ 1.4)")


if __name__ == "__main__":
    main()
