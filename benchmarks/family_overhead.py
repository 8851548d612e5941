"""Entropy calibration cost against a plain forward pass for EVA02-S and Swin v2-T (goal: ratio <= 1.3).

eva02_small_patch14_224 (224 px) and swinv2_tiny_window8_256 (256 px), random weights, batch 16, CPU.
Every side of both models is timed in this one process, alternating, after a warm-up of each.

As in ``entropy_overhead.py``, the figure that matters is the per-batch cost of a real calibration,
which streams thousands of batches: the extra time of calibrating on 2K batches instead of K (the
one-off costs -- shape probe, allocating the histograms, turning counts into entropies -- cancel),
divided by K plain forward batches. The calibration reads its batches through ``forward_loop``, so
both sides feed the very same tensor and no data loader is timed. Each repeat gives one ratio; the
median and the range over the repeats are printed per model, and the worst of the two medians last.

    python benchmarks/family_overhead.py [--batches 2] [--repeats 3] [--bits 8]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import eamvit
from eamvit.methods.calibrate import format_bytes
from eamvit.ops.entropy import AttentionHistogram

MODELS = (("eva02_small_patch14_224", 224), ("swinv2_tiny_window8_256", 256))


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(name: str, size: int, args: argparse.Namespace) -> float:
    """Print one model's timings; return the median per-batch ratio."""
    torch.manual_seed(0)
    model = eamvit.create_model(name)
    batch = torch.randn(args.batch_size, 3, size, size)

    def plain(k: int) -> None:
        with torch.inference_mode():
            for _ in range(k):
                model(batch)

    def calibrate(k: int):
        return eamvit.compute_entropy_maps(model, forward_loop=lambda m: [m(batch) for _ in range(k)],
                                           bits=args.bits, progress=False)

    plain(1)  # warm-up both paths
    maps = calibrate(1)
    t_plain, t_cal, t_cal2, ratios = [], [], [], []
    for _ in range(args.repeats):
        t_plain.append(_seconds(lambda: plain(args.batches)))
        t_cal.append(_seconds(lambda: calibrate(args.batches)))
        t_cal2.append(_seconds(lambda: calibrate(2 * args.batches)))
        ratios.append((t_cal2[-1] - t_cal[-1]) / t_plain[-1])
    shapes = [tuple(s) for s in maps.meta["layer_shapes"]]
    hist = sum(AttentionHistogram.nbytes(s, args.bits, 2 * args.batches * args.batch_size) for s in shapes)
    show = lambda ts: f"median {statistics.median(ts):.3f} s ({', '.join(f'{t:.3f}' for t in ts)})"
    print(f"{name}, {size} px, batch {args.batch_size}, b={args.bits}, {len(shapes)} attention layers, "
          f"histograms {format_bytes(hist)}")
    print(f"  plain forward, {args.batches} batches     {show(t_plain)}")
    print(f"  calibration, {args.batches} batches       {show(t_cal)}")
    print(f"  calibration, {2 * args.batches} batches       {show(t_cal2)}")
    ratio = statistics.median(ratios)
    print(f"  per-batch calibration / plain forward: median {ratio:.3f}, range {min(ratios):.3f}..{max(ratios):.3f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=2, help="K, plain forward batches per repeat (default 2)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per model (default 3)")
    ap.add_argument("--bits", type=int, default=8, help="histogram bits b (default 8)")
    args = ap.parse_args()
    print(f"{torch.get_num_threads()} threads")
    worst = max((bench(name, size, args), name) for name, size in MODELS)
    print(f"worst per-batch calibration / plain forward: {worst[0]:.3f} ({worst[1]})")


if __name__ == "__main__":
    main()
