"""`eamvit optimize --runtime openvino` on the bundled digits ViT, its chosen file against NNCF int8 alone.

Runs ``eamvit optimize --data digits --runtime openvino --max-drop 1.0`` (``--space``: standard by
default; ``--finetune-epochs 20 --finetune-lr 1e-3 --finetune-warmup-epochs 2``: the pruning and merging points
that miss the budget are fine-tuned on the training digits and searched again) in a child process, as a user would, and exports the unmodified model with ``eamvit export``
(fp32). Then, in this process and with plain OpenVINO and NNCF calls (nothing of eamvit's export or
evaluation code): quantizes the fp32 export with ``nncf.quantize`` (TRANSFORMER, the first
``--calib`` training digits, one per sample: what an OpenVINO user runs), compiles the fp32 export,
NNCF's model and optimize's best file (``best.xml`` or ``best.onnx``) for the CPU, scores each on
the 360 held-out test digits, and times the three on the same batch of test digits in alternating
rounds (:func:`eamvit.experiments.timer.time_calls`: warm-up rounds, then every round runs each
once, the first rotating). Each speed-up is the median of the per-round ratios, with quartiles and
spread ((max − min) / median). The machine's load average is printed before and after.

The last line printed is the chosen file's speed-up over NNCF int8 alone (goal: ≥ 1.3).

    python benchmarks/optimize_openvino.py [--space standard|small] [--threads 1] [--batch-size 64]
                                           [--rounds 40] [--warmup 5] [--calib 300] [--out DIR]
                                           [--finetune-epochs 20] [--finetune-lr 1e-3] [--finetune-warmup-epochs 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def eamvit(*args: str) -> None:
    """Run an ``eamvit`` command in a child process, as a user would, failing loudly."""
    subprocess.run([sys.executable, "-m", "eamvit.cli", *args], check=True)


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f} (1, 5, 15 min) on {} CPUs".format(*os.getloadavg(), os.cpu_count())


def compiled(core, path: Path, threads: int):
    return core.compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})


def top1(model, images: np.ndarray, targets: np.ndarray) -> float:
    req = model.create_infer_request()
    logits = np.concatenate([req.infer({0: images[i:i + 64]})[model.output(0)] for i in range(0, len(images), 64)])
    return float((logits.argmax(1) == targets).mean() * 100)


def nncf_int8(core, fp32: Path, calib: np.ndarray, out: Path) -> Path:
    """NNCF's post-training int8 of the fp32 export, as its documentation shows it for transformers."""
    import nncf
    import openvino as ov

    data = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    q = nncf.quantize(core.read_model(str(fp32)), data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    ov.save_model(q, str(out), compress_to_fp16=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="standard", choices=("standard", "small"), help="optimize's search space")
    p.add_argument("--threads", type=int, default=1, help="OpenVINO threads, for optimize and for this timing")
    p.add_argument("--batch-size", type=int, default=64, help="test digits per timed call")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--calib", type=int, default=300, help="NNCF's calibration digits (its default subset size)")
    p.add_argument("--out", default=None, help="keep optimize's folder here (default: a temporary one)")
    p.add_argument("--finetune-epochs", type=int, default=20, help="optimize's --finetune-epochs (0: post-training only)")
    p.add_argument("--finetune-lr", default="1e-3", help="optimize's --finetune-lr")
    p.add_argument("--finetune-warmup-epochs", default="2", help="optimize's --finetune-warmup-epochs")
    args = p.parse_args()
    import openvino as ov

    from eamvit.experiments.timer import Stats, ratio_stats, time_calls
    from eamvit.methods.data import DigitsDataset  # the data only: training digits, the 360 held-out test digits

    test, train = DigitsDataset("test"), DigitsDataset("train")
    images, targets = test.images.numpy(), test.targets.numpy()
    print(f"before: {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "optimize")
        t0 = time.perf_counter()
        tuning = ["--finetune-epochs", str(args.finetune_epochs), "--finetune-lr", args.finetune_lr,
                  "--finetune-warmup-epochs", args.finetune_warmup_epochs] if args.finetune_epochs else []
        eamvit("optimize", "--data", "digits", "--runtime", "openvino", "--space", args.space, "--max-drop", "1.0",
               "--threads", str(args.threads), *tuning, "--out", str(out))
        print(f"eamvit optimize --runtime openvino --space {args.space} {' '.join(tuning)}: "
              f"{time.perf_counter() - t0:.0f} s")
        eamvit("export", "--data", "digits", "--out", str(Path(tmp) / "fp32.onnx"))
        core = ov.Core()
        nncf_path = nncf_int8(core, Path(tmp) / "fp32.onnx", train.images[:args.calib].numpy(), Path(tmp) / "nncf.xml")
        best_path = out / "best.xml" if (out / "best.xml").exists() else out / "best.onnx"
        models = {"fp32 export": compiled(core, Path(tmp) / "fp32.onnx", args.threads),
                  "NNCF int8 alone": compiled(core, nncf_path, args.threads),
                  f"optimize's {best_path.name}": compiled(core, best_path, args.threads)}
        acc = {name: top1(m, images, targets) for name, m in models.items()}
        x = images[:args.batch_size]
        reqs = [m.create_infer_request() for m in models.values()]
        calls = [lambda r=r: r.infer({0: x}) for r in reqs]
        times = time_calls(calls, warmup=args.warmup, reps=args.rounds)
    print(f"top-1 on the {len(targets)} test digits (OpenVINO): "
          + ", ".join(f"{name} {a:.2f}%" for name, a in acc.items()))
    for (name, t) in zip(models, times):
        s = Stats.of(t)
        print(f"{name}: {args.batch_size / s.median:,.0f} images/s (median {s.median * 1e3:.2f} ms, spread "
              f"{s.spread:.2f})")
    fp32, nncf_t, best_t = times

    def show(r) -> str:
        return f"x{r.median:.3f} (p25 x{r.p25:.3f}, p75 x{r.p75:.3f}, spread {r.spread:.2f})"

    print(f"over the fp32 export: NNCF int8 alone {show(ratio_stats(fp32, nncf_t))}, "
          f"optimize's {best_path.name} {show(ratio_stats(fp32, best_t))}")
    print(f"after: {load()}")
    r = ratio_stats(nncf_t, best_t)
    print(f"optimize's {best_path.name} speed-up over NNCF int8 alone in OpenVINO ({args.threads} thread(s), batch "
          f"{len(x)}, {args.rounds} alternating rounds): {show(r)}")


if __name__ == "__main__":
    main()
