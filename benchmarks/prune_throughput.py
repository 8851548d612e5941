"""Wall-clock throughput of token pruning on CPU: unpruned DeiT-S, EViT κ=0.7, entropy κ=0.7.

deit_small_patch16_224, random weights, 224 px, batch 32, one process. The configurations are
timed in interleaved rounds (unpruned, EViT, Shannon, Rényi α=2, unpruned, ...) so that other load
on the machine hits them alike, after one warm-up forward each; each one's throughput is the median
of its rounds (wall clock), shown with the spread (slowest and fastest round). Ratios of the best
rounds and of process CPU time are printed too, as checks that are less sensitive to other load.
Prints the EViT/unpruned, entropy/EViT and, last, the entropy/unpruned ratio of medians (entropy =
the slower of Shannon and Rényi α=2).
Goals: entropy ≥ 1.5× unpruned and ≥ 0.97× EViT.

    python benchmarks/prune_throughput.py [--rounds 5] [--batch-size 32] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from eamvit import create_model
from eamvit.methods.cost import count_gflops
from eamvit.methods.prune import PruneConfig, prune_, unprune_


def timed(model, x) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one forward."""
    t0, c0 = time.perf_counter(), time.process_time()
    model(x)
    return time.perf_counter() - t0, time.process_time() - c0


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

    def apply(cfg):
        unprune_(model)
        if cfg is not None:
            prune_(model, cfg)

    gflops = {}
    for name, cfg in configs.items():
        apply(cfg)
        gflops[name] = count_gflops(model)
    walls: dict[str, list[float]] = {name: [] for name in configs}
    cpus: dict[str, list[float]] = {name: [] for name in configs}
    with torch.inference_mode():
        for name, cfg in configs.items():  # warm-up: one forward each
            apply(cfg)
            model(x)
        for r in range(args.rounds):
            for name, cfg in configs.items():
                apply(cfg)
                wall, cpu = timed(model, x)
                walls[name].append(wall)
                cpus[name].append(cpu)
    ips = {name: args.batch_size / statistics.median(t) for name, t in walls.items()}
    best = {name: args.batch_size / min(t) for name, t in walls.items()}
    print(f"deit_small_patch16_224, batch {args.batch_size}, 224 px, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds [slowest, fastest]")
    for name in configs:
        lo, hi = args.batch_size / max(walls[name]), best[name]
        print(f"  {name:10s} {ips[name]:8.2f} images/s [{lo:.2f}, {hi:.2f}]  {gflops[name]:.2f} GFLOPs")
    # Best rounds and CPU time are less sensitive to other processes on a shared machine; for diagnosis.
    cpu = {name: min(t) for name, t in cpus.items()}
    print("CPU-time ratios to unpruned: " + "  ".join(
        f"{name} {cpu['unpruned'] / cpu[name]:.3f}" for name in configs if name != "unpruned"))
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
