"""RepQ-ViT W4/A4 calibration time ÷ one full-precision forward of the same images (goal: ≤ 3).

deit_small_patch16_224 with random weights, 32 random 224 px images, CPU. Both sides are timed in
this one run by eamvit's one timer (:mod:`eamvit.experiments.timer`), alternating, after a warm-up
of each: every repetition times one FP forward of the calibration images and one calibration of a
fresh copy of the model (copied outside the timed call). The ratio is taken per repetition (a
forward and a calibration timed back to back share the machine's load) and its median and spread
are printed, the median last.

    python benchmarks/repq_calibration.py [--model deit_small_patch16_224] [--images 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy

import torch

import eamvit
from eamvit import RepQConfig, quantize_
from eamvit.experiments.timer import Stats, ratio_stats, time_calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = eamvit.create_model(args.model)
    images = torch.randn(args.images, 3, args.img_size, args.img_size)
    config = RepQConfig(w_bits=args.w_bits, a_bits=args.a_bits, calib_size=args.images)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, "
          f"{args.images} images of {args.img_size} px, W{args.w_bits}/A{args.a_bits}")

    def forward() -> None:
        with torch.inference_mode():
            model(images)

    fresh = [copy.deepcopy(model)]  # models for the calibrations to quantize, copied outside their timed calls

    def calibrate() -> None:
        quantize_(fresh.pop(), config, images, progress=False)

    def copy_next() -> None:  # timed too (each call is), but not counted
        fresh.append(copy.deepcopy(model))

    # Each repetition runs every call once (a pop and an append), so a copy is always ready.
    t_fp, t_cal, _ = time_calls([forward, calibrate, copy_next], warmup=1, reps=args.repeats)
    fp, cal = Stats.of(t_fp), Stats.of(t_cal)
    ratio = ratio_stats(t_cal, t_fp)
    print(f"FP forward:   median {fp.median:.3f} s, spread {fp.spread:.0%} ({', '.join(f'{t:.3f}' for t in t_fp)})")
    print(f"calibration:  median {cal.median:.3f} s, spread {cal.spread:.0%} ({', '.join(f'{t:.3f}' for t in t_cal)})")
    print(f"calibration / FP forward per repetition: median {ratio.median:.2f}, "
          f"range {ratio.min:.2f}..{ratio.max:.2f} ({ratio.n} repetitions)")
    print(f"ratio {ratio.median:.2f}")


if __name__ == "__main__":
    main()
