"""Does frozen attention run faster? Executed head and row freezing, and simulated entry freezing, on CPU.

deit_small_patch16_224, random weights, 224 px, batch 32, one process. Four copies of the same model
(unfrozen; head granularity τ=0.5; row granularity τ=0.5; entry granularity τ=0.5, the paper's
simulation) are timed by eamvit's one timer (:mod:`eamvit.experiments.timer`) after a warm-up round.
Each configuration is timed in *pairs* with the unfrozen model: in every round, each configuration
runs right next to an unfrozen forward (which one goes first alternates from round to round, and the
order of the configurations rotates), so that load on the machine that drifts during the run hits both
members of a pair alike. A ratio to the unfrozen model is the median over rounds of that round's
pair ratio (unfrozen time ÷ the configuration's time), printed with its spread over the rounds
(quartiles and range) and with the ratio of the median images/s beside it; each is set against the
cost model's predicted ratio (full ÷ executed MACs, :mod:`eamvit.methods.cost`) as the share of the
predicted saving realised. The load average before and after is printed: on a loaded machine, trust
the paired median and look at its spread. Last line: the measured head ratio. Goals: head and row
freezing realise ≥ 90 % of their predicted saving; entry simulation costs ≤ 10 %.

    python benchmarks/freeze_speed.py [--rounds 9] [--warmup 1] [--batch-size 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
from torch.utils.data import TensorDataset

from eamvit import compute_entropy_maps, create_model
from eamvit.experiments.timer import Stats, ratio_stats, time_calls
from eamvit.methods.cost import cost_account
from eamvit.methods.freeze import FreezeConfig, freeze_
from eamvit.ops.cost import realised_fraction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=1)
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
    configs = [n for n in models if n != "unfrozen"]
    times: dict[str, list[float]] = {n: [] for n in models}
    pairs: dict[str, list[tuple[float, float]]] = {n: [] for n in configs}  # (unfrozen, configuration)
    load_before = os.getloadavg()[0]
    call = {n: (lambda m: lambda: m(x))(m) for n, m in models.items()}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for c in call.values():
                c()
        for r in range(args.rounds):
            for j in range(len(configs)):
                name = configs[(r + j) % len(configs)]
                order = ["unfrozen", name] if r % 2 == 0 else [name, "unfrozen"]
                t = {n: ts[0] for n, ts in zip(order, time_calls([call[n] for n in order], warmup=0, reps=1))}
                pairs[name].append((t["unfrozen"], t[name]))
                for n in order:
                    times[n].append(t[n])
    load_after = os.getloadavg()[0]

    ips = {n: args.batch_size / Stats.of(t).median for n, t in times.items()}
    print(f"deit_small_patch16_224, batch {args.batch_size}, 224 px, {torch.get_num_threads()} threads, "
          f"tau {args.tau}, {args.rounds} rounds of paired forwards after {args.warmup} warm-up; "
          f"load average {load_before:.2f} before, {load_after:.2f} after")
    for n, t in times.items():
        lo, hi = args.batch_size / max(t), args.batch_size / min(t)
        print(f"  {n:9s} {ips[n]:7.2f} images/s (min {lo:.2f}, max {hi:.2f})  {gmacs[n]:.3f} GMACs executed")
    paired = {n: ratio_stats([u for u, _ in p], [c for _, c in p]) for n, p in pairs.items()}
    for n in configs:
        st = paired[n]
        spread = f"rounds: quartiles {st.p25:.3f}-{st.p75:.3f}, range {st.min:.3f}-{st.max:.3f}"
        share = realised_fraction(st.median, predicted[n])
        share_txt = f"{100 * share:.0f} % of the predicted saving realised" if share is not None else \
            f"simulation costs {100 * (1 / st.median - 1):+.1f} % time"
        print(f"{n}/unfrozen measured {st.median:.3f} ({spread}; ratio of medians {ips[n] / ips['unfrozen']:.3f}), "
              f"predicted {predicted[n]:.3f}: {share_txt}")
    print(f"head/unfrozen {paired['head'].median:.3f}")


if __name__ == "__main__":
    main()
