"""Entropy calibration cost against a plain forward pass (goal: ratio <= 1.15).

deit_tiny_patch16_224, random weights, 224 px, batch 16, the same images for both sides, CPU.
Both sides are timed in this one run, alternating, by eamvit's one timer
(:mod:`eamvit.experiments.timer`), and the median of the repeats is used.

Calibration has a one-off cost (a shape probe, allocating the histograms, turning counts into
entropies) and a per-batch cost. A real calibration streams thousands of batches (the paper uses 5 %
of ImageNet), so the figure that matters is the per-batch one: the extra time of calibrating on
2K batches instead of K, divided by K plain forward batches. It is printed last; the end-to-end ratio
on K batches is printed too. Also prints the histograms' memory against the L*H*N^2*2^b counts.

    python benchmarks/entropy_overhead.py [--batches 4] [--repeats 3] [--bits 8]
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import TensorDataset

import eamvit
from eamvit.experiments.timer import Stats, time_calls
from eamvit.methods.calibrate import format_bytes
from eamvit.ops.entropy import AttentionHistogram


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", type=int, default=8)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = eamvit.create_model("deit_tiny_patch16_224")
    n = args.batches * args.batch_size
    batch = torch.randn(args.batch_size, 3, 224, 224)
    images = batch.repeat(2 * args.batches, 1, 1, 1)  # the same images on both sides
    ds = TensorDataset(images, torch.zeros(len(images), dtype=torch.long))

    def plain(batches: int) -> None:
        with torch.inference_mode():
            for _ in range(batches):
                model(batch)

    def calibrate(batches: int):
        return eamvit.compute_entropy_maps(model, ds, indices=range(batches * args.batch_size), bits=args.bits,
                                           batch_size=args.batch_size, progress=False)

    plain(args.batches)  # warm-up both paths
    maps = calibrate(1)
    t_plain, t_cal, t_cal2 = time_calls([lambda: plain(args.batches), lambda: calibrate(args.batches),
                                         lambda: calibrate(2 * args.batches)], warmup=0, reps=args.repeats)
    p, c, c2 = (Stats.of(t).median for t in (t_plain, t_cal, t_cal2))

    shapes = [tuple(s) for s in maps.meta["layer_shapes"]]
    counts = sum(torch.Size(s).numel() for s in shapes) * (1 << args.bits)
    hist_bytes = sum(AttentionHistogram.nbytes(s, args.bits, n) for s in shapes)
    L, (H, N, _) = len(shapes), shapes[0]
    print(f"model deit_tiny_patch16_224, {n} images, batch {args.batch_size}, b={args.bits}, "
          f"{torch.get_num_threads()} threads")
    print(f"plain forward, {args.batches} batches   median {p:.3f} s  ({', '.join(f'{t:.3f}' for t in t_plain)})")
    print(f"calibration, {args.batches} batches     median {c:.3f} s  ({', '.join(f'{t:.3f}' for t in t_cal)})")
    print(f"calibration, {2 * args.batches} batches     median {c2:.3f} s  ({', '.join(f'{t:.3f}' for t in t_cal2)})")
    print(f"histogram memory {format_bytes(hist_bytes)} for L*H*N^2*2^b = {L}*{H}*{N}^2*{1 << args.bits} = "
          f"{counts:,} counts: {hist_bytes / counts:.3f} bytes per count (counts + float64 running sum)")
    print(f"end-to-end calibration of {args.batches} batches / plain forward: {c / p:.3f}")
    print(f"per-batch calibration / plain forward: {(c2 - c) / p:.3f}")


if __name__ == "__main__":
    main()
