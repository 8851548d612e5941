"""Does frozen attention run faster? Executed head and row freezing, and simulated entry freezing, on CPU.

deit_small_patch16_224, random weights, 224 px, batch 32, one process. Four copies of the same model
(unfrozen; head granularity τ=0.5; row granularity τ=0.5; entry granularity τ=0.5, the paper's
simulation) are timed by eamvit's one timer (:mod:`eamvit.experiments.timer`) in interleaved rounds
after warm-up, so that other load on the machine hits them alike. Each is reported as the median images/s over the rounds with its spread (min–max), next to the
cost model's predicted ratio (full ÷ executed MACs, :mod:`eamvit.methods.cost`). A ratio to the
unfrozen model is the median over rounds of that round's unfrozen time ÷ the configuration's time
(paired: both ran back to back, so load that drifts during the run cancels); the ratio of the
median images/s is printed too. Printed: each ratio, the share of the predicted saving realised,
and, last, the measured head ratio. Goals: head freezing realises ≥ 90 % of its predicted saving;
entry simulation costs ≤ 10 %.

    python benchmarks/freeze_speed.py [--rounds 7] [--warmup 2] [--batch-size 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.data import TensorDataset

from eamvit import compute_entropy_maps, create_model
from eamvit.experiments.timer import Stats, ratio_stats, time_calls
from eamvit.methods.cost import cost_account
from eamvit.methods.freeze import FreezeConfig, freeze_
from eamvit.ops.cost import realised_fraction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = create_model("deit_small_patch16_224").eval()  # random weights
    g = torch.Generator().manual_seed(0)
    calib = TensorDataset(torch.randn(4, 3, 224, 224, generator=g), torch.zeros(4, dtype=torch.long))
    # Speed does not depend on which units are frozen; 2-bit histograms keep calibration memory small.
    maps = compute_entropy_maps(base, calib, bits=2, batch_size=4, progress=False)
    models = {"unfrozen": base}
    for gran in ("head", "row", "entry"):
        m = copy.deepcopy(base)
        freeze_(m, maps, FreezeConfig(tau=args.tau, granularity=gran))
        models[gran] = m
    predicted = {name: cost_account(m).predicted_speedup for name, m in models.items()}
    gmacs = {name: cost_account(m).gmacs for name, m in models.items()}

    x = torch.randn(args.batch_size, 3, 224, 224, generator=g)
    with torch.inference_mode():
        calls = [(lambda m: lambda: m(x))(m) for m in models.values()]
        times = dict(zip(models, time_calls(calls, warmup=args.warmup, reps=args.rounds)))

    ips = {n: args.batch_size / Stats.of(t).median for n, t in times.items()}
    print(f"deit_small_patch16_224, batch {args.batch_size}, 224 px, {torch.get_num_threads()} threads, "
          f"tau {args.tau}, median of {args.rounds} interleaved rounds after {args.warmup} warm-up")
    for n, t in times.items():
        lo, hi = args.batch_size / max(t), args.batch_size / min(t)
        print(f"  {n:9s} {ips[n]:7.2f} images/s (min {lo:.2f}, max {hi:.2f})  {gmacs[n]:.3f} GMACs executed")
    paired = {n: ratio_stats(times["unfrozen"], times[n]).median for n in models}
    for n in ("head", "row", "entry"):
        share = realised_fraction(paired[n], predicted[n])
        share_txt = f"{100 * share:.0f} % of the predicted saving realised" if share is not None else \
            f"simulation costs {100 * (1 / paired[n] - 1):+.1f} % time"
        print(f"{n}/unfrozen measured {paired[n]:.3f} (ratio of medians {ips[n] / ips['unfrozen']:.3f}), "
              f"predicted {predicted[n]:.3f}: {share_txt}")
    print(f"head/unfrozen {paired['head']:.3f}")


if __name__ == "__main__":
    main()
