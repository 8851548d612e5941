"""Real int8 speed in ONNX Runtime: eamvit's RepQ-ViT W8/A8 export against ONNX Runtime's own int8.

deit_small_patch16_224, random weights, 224 px, batch 32, 2 threads (PyTorch and ONNX Runtime), all
in one process: PyTorch eager fp32, ONNX Runtime fp32 (eamvit's fp32 export), ONNX Runtime's own
``quantize_static`` int8 (QDQ, per-channel weights, MinMax, the same 32 calibration images), eamvit's
int8 QDQ export (RepQ-ViT W8/A8, 32 calibration images) and that export pruned at κ = 0.7 at blocks
4, 7, 10 (0-based 3, 6, 9; EViT scores). eamvit's one timer (:mod:`eamvit.experiments.timer`) times
them: after one warm-up call each, in interleaved rounds (so other load on the machine hits them
alike); each reports the median and the spread ((max − min)/median) of its rounds, and each ratio is
the median over rounds of that round's ratio (paired, so drift cancels; the best-round ratios are
printed too, as a check that is less sensitive to other load). The optimised ONNX Runtime graph of
the eamvit export is checked for integer kernels. Prints each ÷ ONNX Runtime fp32 and ÷ PyTorch eager
fp32, and, last, eamvit int8 ÷ ONNX Runtime fp32. Goals: eamvit int8 ≥ 1.6×, int8 + pruning ≥ 2.3× ONNX
Runtime fp32.

    python benchmarks/export_speed.py [--rounds 7] [--batch-size 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from eamvit import create_model
from eamvit.experiments.timer import Stats, ratio_stats, time_calls
from eamvit.methods.export import ExportConfig, export_onnx
from eamvit.methods.export_runtime import onnx_session, optimized_ops, ort_quantize_static
from eamvit.methods.prune import PruneConfig, prune_
from eamvit.methods.quantize import quantize_
from eamvit.methods.repq import RepQConfig

INTEGER_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QLinearConv", "DynamicQuantizeMatMul")


def build(d: Path, args) -> dict:
    """Every configuration as a zero-argument call on the timing batch."""
    torch.manual_seed(0)
    model = create_model("deit_small_patch16_224")  # random weights
    calib = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    x = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    export_onnx(model, d / "fp32.onnx")
    ort_quantize_static(d / "fp32.onnx", d / "ort_int8.onnx", calib)
    t0 = time.perf_counter()
    q = quantize_(copy.deepcopy(model), RepQConfig(w_bits=8, a_bits=8), calib, progress=False)
    print(f"RepQ-ViT W8/A8 calibration: {time.perf_counter() - t0:.1f} s")
    export_onnx(q, d / "eamvit_int8.onnx", ExportConfig(softmax=args.softmax))
    prune_(q, PruneConfig(method="evit", keep_rate=args.keep_rate, blocks=(3, 6, 9)))
    export_onnx(q, d / "eamvit_int8_pruned.onnx", ExportConfig(softmax=args.softmax))
    ops = optimized_ops(d / "eamvit_int8.onnx", args.threads)
    print("eamvit int8, optimised graph: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())
                                                       if k in INTEGER_KERNELS + ("MatMul", "Gemm", "Conv")))
    xn = x.numpy()
    calls = {"PyTorch eager fp32": lambda: model(x)}
    for name, f in (("ORT fp32", "fp32"), ("ORT quantize_static int8", "ort_int8"),
                    ("eamvit int8", "eamvit_int8"), ("eamvit int8 + pruning", "eamvit_int8_pruned")):
        s = onnx_session(d / f"{f}.onnx", args.threads)
        calls[name] = (lambda s: lambda: s.run(None, {"images": xn}))(s)
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-rate", type=float, default=0.7)
    ap.add_argument("--softmax", default="uniform", choices=["uniform", "fp32"],
                    help="how the log√2 post-softmax quantizer exports (default uniform 8-bit)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        calls = build(Path(d), args)
        times = dict(zip(calls, time_calls(list(calls.values()), warmup=1, reps=args.rounds)))
    stats = {n: Stats.of(t) for n, t in times.items()}

    def over(ref: str, n: str) -> float:
        return ratio_stats(times[ref], times[n]).median  # paired: the two ran in the same round
    print(f"deit_small_patch16_224, batch {args.batch_size}, 224 px, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds")
    for n, s in stats.items():
        print(f"  {n:26s} {args.batch_size / s.median:7.2f} images/s  spread {s.spread:5.1%}  "
              f"÷ ORT fp32 {over('ORT fp32', n):.2f}  ÷ PyTorch eager {over('PyTorch eager fp32', n):.2f}")
    best = {n: s.min for n, s in stats.items()}  # the least disturbed round: a check on a shared machine
    print("best-round ratios to ORT fp32: " + "  ".join(f"{n} {best['ORT fp32'] / best[n]:.2f}" for n in times))
    print(f"eamvit int8 + pruning ÷ ORT fp32 {over('ORT fp32', 'eamvit int8 + pruning'):.3f}")
    print(f"eamvit int8 ÷ ORT fp32 {over('ORT fp32', 'eamvit int8'):.3f}")


if __name__ == "__main__":
    main()
