"""Wall-clock throughput of token pruning on CPU: unpruned DeiT-S, EViT κ=0.7, entropy κ=0.7.

deit_small_patch16_224, random weights, 224 px, batch 32, one process. One pruned copy of the model
per configuration; eamvit's one timer (:mod:`eamvit.experiments.timer`) times them in interleaved
rounds (unpruned, EViT, Shannon, Rényi α=2, unpruned, ...) so that other load on the machine hits
them alike, after one warm-up forward each; each one's throughput is the median of its rounds (wall
clock), shown with the spread (slowest and fastest round). Ratios of the best rounds are printed too,
as a check that is less sensitive to other load.
Prints the EViT/unpruned, entropy/EViT and, last, the entropy/unpruned ratio of medians (entropy =
the slower of Shannon and Rényi α=2).
Goals: entropy ≥ 1.5× unpruned and ≥ 0.97× EViT.

    python benchmarks/prune_throughput.py [--rounds 5] [--batch-size 32] [--threads N]
"""
from __future__ import annotations

import argparse
import copy

import torch

from eamvit import create_model
from eamvit.experiments.timer import Stats, time_calls
from eamvit.methods.cost import count_gflops
from eamvit.methods.prune import PruneConfig, prune_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--keep-rate", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = create_model("deit_small_patch16_224")  # random weights
    x = torch.randn(args.batch_size, 3, 224, 224)
    configs = {
        "unpruned": None,
        "EViT": PruneConfig(method="evit", keep_rate=args.keep_rate),
        "Shannon": PruneConfig(method="shannon", keep_rate=args.keep_rate),
        "Rényi α=2": PruneConfig(method="renyi", alpha=2.0, keep_rate=args.keep_rate),
    }

    models = {}
    for name, cfg in configs.items():
        models[name] = copy.deepcopy(model)
        if cfg is not None:
            prune_(models[name], cfg)
    gmacs = {name: count_gflops(m) for name, m in models.items()}
    with torch.inference_mode():
        calls = [(lambda m: lambda: m(x))(m) for m in models.values()]
        walls = dict(zip(models, time_calls(calls, warmup=1, reps=args.rounds)))
    ips = {name: args.batch_size / Stats.of(t).median for name, t in walls.items()}
    best = {name: args.batch_size / min(t) for name, t in walls.items()}
    print(f"deit_small_patch16_224, batch {args.batch_size}, 224 px, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds [slowest, fastest]")
    for name in configs:
        lo, hi = args.batch_size / max(walls[name]), best[name]
        print(f"  {name:10s} {ips[name]:8.2f} images/s [{lo:.2f}, {hi:.2f}]  {gmacs[name]:.2f} GMACs")
    # Best rounds are less sensitive to other processes on a shared machine; for diagnosis.
    best_entropy = min(best["Shannon"], best["Rényi α=2"])
    print(f"best rounds: entropy/unpruned {best_entropy / best['unpruned']:.3f}  "
          f"entropy/EViT {best_entropy / best['EViT']:.3f}")
    entropy = min(ips["Shannon"], ips["Rényi α=2"])
    print(f"Shannon/unpruned {ips['Shannon'] / ips['unpruned']:.3f}  Rényi α=2/unpruned "
          f"{ips['Rényi α=2'] / ips['unpruned']:.3f}")
    print(f"EViT/unpruned {ips['EViT'] / ips['unpruned']:.3f}")
    print(f"entropy/EViT {entropy / ips['EViT']:.3f}")
    print(f"entropy/unpruned {entropy / ips['unpruned']:.3f}")


if __name__ == "__main__":
    main()
