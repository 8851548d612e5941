"""RepQ-ViT W4/A4 calibration time ÷ one full-precision forward of the same images.

deit_small_patch16_224 with random weights, 32 random 224 px images, CPU. Both sides are measured
in this run by eamvit's one timer (:mod:`eamvit.experiments.timer`), best of ``--repeats``; the
ratio is the last line printed. Goal: ≤ 20 (the reference
code spends about 400× here, in Python loops over channels and rows).

    python benchmarks/repq_calibration.py [--model deit_small_patch16_224] [--images 32] [--repeats 2]
"""
from __future__ import annotations

import argparse
import copy

import torch

import eamvit
from eamvit import RepQConfig, quantize_
from eamvit.experiments.timer import time_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = eamvit.create_model(args.model)
    images = torch.randn(args.images, 3, args.img_size, args.img_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, "
          f"{args.images} images of {args.img_size} px")

    with torch.inference_mode():
        model(images[:2])  # warm-up
        t_fp = time_call(lambda: model(images), warmup=0, reps=args.repeats).min
    print(f"FP forward: {t_fp:.3f} s (best of {args.repeats})")

    fresh = []  # each repetition quantizes its own copy, made outside the timed call

    def calibrate() -> None:
        quantize_(fresh.pop(), RepQConfig(w_bits=args.w_bits, a_bits=args.a_bits, calib_size=args.images), images,
                  progress=False)

    t_cal = float("inf")
    for _ in range(args.repeats):  # one copy at a time: a model's worth of memory, not ``repeats``
        fresh.append(copy.deepcopy(model))
        t_cal = min(t_cal, time_call(calibrate, warmup=0, reps=1).min)
    print(f"RepQ W{args.w_bits}/A{args.a_bits} calibration: {t_cal:.3f} s (best of {args.repeats})")
    print(f"ratio {t_cal / t_fp:.2f}")


if __name__ == "__main__":
    main()
