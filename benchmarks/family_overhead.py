"""Entropy calibration cost against a plain forward pass for EVA02-S and Swin v2-T (goal: ratio <= 1.3).

eva02_small_patch14_224 (224 px) and swinv2_tiny_window8_256 (256 px), random weights, batch 16, CPU.
Every side of both models is timed in this one process, alternating, after a warm-up round of each.

The figure that matters is the per-batch cost of a real calibration, which streams thousands of
batches, so the one-off costs (the shape probe, allocating the histograms, turning counts into
entropies) are left out: the calibration reads its batches through ``forward_loop``, and the loop
times each forward it runs while the histograms are being counted (the forward that probes the
shapes is not counted). The plain side times the same forwards of the same tensor on the
uninstrumented path. Both sides time their forwards with eamvit's one timer
(:mod:`eamvit.experiments.timer`). Each side's batches give a median and quartiles; the ratio of
the medians is printed per model, and the worst of the two last.

    python benchmarks/family_overhead.py [--batches 3] [--rounds 2] [--bits 8]
"""
from __future__ import annotations

import argparse

import torch

import eamvit
from eamvit.experiments.timer import Stats, time_calls
from eamvit.methods.calibrate import format_bytes
from eamvit.ops.entropy import AttentionHistogram

MODELS = (("eva02_small_patch14_224", 224), ("swinv2_tiny_window8_256", 256))


def _quartiles(ts: list[float]) -> str:
    s = Stats.of(ts)
    return f"median {s.median:.3f} s, quartiles {s.p25:.3f}..{s.p75:.3f} s ({s.n} batches)"


def bench(name: str, size: int, args: argparse.Namespace) -> float:
    """Print one model's timings; return the ratio of the median batch times."""
    torch.manual_seed(0)
    model = eamvit.create_model(name)
    batch = torch.randn(args.batch_size, 3, size, size)

    def plain(times: list[float]) -> None:
        with torch.inference_mode():
            times += time_calls([lambda: model(batch)], warmup=0, reps=args.batches)[0]

    def calibrate(times: list[float]):
        calls = []

        def forward_loop(m) -> None:
            calls.append(len(calls))
            t = time_calls([lambda: m(batch)], warmup=0, reps=args.batches)[0]
            if len(calls) > 1:  # the first call is the shape probe
                times.extend(t)

        return eamvit.compute_entropy_maps(model, forward_loop=forward_loop, bits=args.bits, progress=False)

    maps = calibrate([])  # warm-up round of both sides
    plain([])
    t_plain, t_cal = [], []
    for _ in range(args.rounds):
        plain(t_plain)
        calibrate(t_cal)
    shapes = [tuple(s) for s in maps.meta["layer_shapes"]]
    hist = sum(AttentionHistogram.nbytes(s, args.bits, args.batches * args.batch_size) for s in shapes)
    print(f"{name}, {size} px, batch {args.batch_size}, b={args.bits}, {len(shapes)} attention layers, "
          f"histograms {format_bytes(hist)}")
    print(f"  plain forward          {_quartiles(t_plain)}")
    print(f"  calibration forward    {_quartiles(t_cal)}")
    ratio = Stats.of(t_cal).median / Stats.of(t_plain).median
    print(f"  per-batch calibration / plain forward: {ratio:.3f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=3, help="batches per side in each round (default 3)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per model, after the warm-up (default 2)")
    ap.add_argument("--bits", type=int, default=8, help="histogram bits b (default 8)")
    args = ap.parse_args()
    print(f"{torch.get_num_threads()} threads")
    worst = max((bench(name, size, args), name) for name, size in MODELS)
    print(f"worst per-batch calibration / plain forward: {worst[0]:.3f} ({worst[1]})")


if __name__ == "__main__":
    main()
