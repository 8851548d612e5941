"""`eamvit optimize` on the bundled digits ViT, then its best.onnx timed by plain ONNX Runtime, outside eamvit.

Runs ``eamvit optimize --data digits --max-drop 1.0`` (the standard search space) into a temporary
folder, exports the unmodified model with ``eamvit export`` (fp32), and then, with nothing of eamvit's
timing or evaluation code: opens both files in plain ``onnxruntime.InferenceSession`` s, checks the
top-1 of each on the 360 held-out test digits (and that best.onnx is within 1.0 point of the fp32
export), and times them on the same batch of test digits: warm-up calls first, then rounds in which
both run once, the first of the two alternating from round to round; the speed-up is the median of
the per-round ratios fp32 / best, with quartiles. The last line printed is that speed-up.
Goal: ≥ 1.3× on a CPU with VNNI; done when ≥ 1.15× with top-1 within 1.0 point.

    python benchmarks/optimize_digits.py [--threads 1] [--batch-size 64] [--rounds 40] [--warmup 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def eamvit(*args: str) -> None:
    """Run an ``eamvit`` command in a child process, as a user would, failing loudly."""
    subprocess.run([sys.executable, "-m", "eamvit.cli", *args], check=True)


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def top1(s, images: np.ndarray, targets: np.ndarray) -> float:
    logits = np.concatenate([s.run(None, {"images": images[i:i + 64]})[0] for i in range(0, len(images), 64)])
    return float((logits.argmax(1) == targets).mean() * 100)


def alternate(a, b, warmup: int, rounds: int) -> list[float]:
    """Per-round ratios time(a) / time(b), the first of the two alternating."""
    for _ in range(warmup):
        a(), b()
    ratios = []
    for r in range(rounds):
        t = {}
        for name, call in ((("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a))):
            t0 = time.perf_counter()
            call()
            t[name] = time.perf_counter() - t0
        ratios.append(t["a"] / t["b"])
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads, for optimize and for this timing")
    p.add_argument("--batch-size", type=int, default=64, help="test digits per timed call")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None, help="keep optimize's folder here (default: a temporary one)")
    args = p.parse_args()
    from eamvit.methods.data import DigitsDataset  # the data only: the 360 held-out test digits

    test = DigitsDataset("test")
    images, targets = test.images.numpy(), test.targets.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "optimize")
        t0 = time.perf_counter()
        eamvit("optimize", "--data", "digits", "--max-drop", "1.0", "--threads", str(args.threads), "--out", str(out))
        print(f"eamvit optimize: {time.perf_counter() - t0:.0f} s")
        eamvit("export", "--data", "digits", "--out", str(Path(tmp) / "fp32.onnx"))
        fp32, best = session(Path(tmp) / "fp32.onnx", args.threads), session(out / "best.onnx", args.threads)
        acc_fp32, acc_best = top1(fp32, images, targets), top1(best, images, targets)
        print(f"top-1 on the {len(targets)} test digits: fp32 export {acc_fp32:.2f}%, best.onnx {acc_best:.2f}% "
              f"(drop {acc_fp32 - acc_best:.2f}; {'within' if acc_fp32 - acc_best <= 1.0 else 'NOT within'} 1.0)")
        x = images[:args.batch_size]
        ratios = alternate(lambda: fp32.run(None, {"images": x}), lambda: best.run(None, {"images": x}),
                           args.warmup, args.rounds)
    q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    print(f"best.onnx speed-up over the fp32 export in ONNX Runtime ({args.threads} thread(s), batch "
          f"{len(x)}, {args.rounds} alternating rounds): x{med:.3f} (p25 x{q1:.3f}, p75 x{q3:.3f})")


if __name__ == "__main__":
    main()
