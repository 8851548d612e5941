"""Wall-clock throughput of token merging (ToMe) on CPU: unmerged DeiT-S, eamvit's ToMe, a plain PyTorch ToMe.

deit_small_patch16_224, random weights, 224 px, batch 32, one process. ``r`` (tokens merged in every
block) is the one whose executed GMACs (eamvit's cost account) come closest to entropy pruning at
κ = 0.7 (blocks 3, 6, 9), so that merging and pruning are compared at equal work. Three copies of the
model: timm's unmerged model, eamvit's ``merge_`` at that ``r`` (proportional attention on), and the
same ToMe step written here in plain PyTorch on timm's classes (bipartite matching on the keys averaged
over heads, class token protected, size-weighted merge, ``log size`` on the scores through the fused
attention kernel): the reference for eamvit's overhead. eamvit's one timer
(:mod:`eamvit.experiments.timer`) times them in interleaved rounds after one warm-up forward each;
throughput is the median of the rounds (wall clock), shown with the slowest and fastest round, and
each ratio is the median of per-round ratios (so that load on the machine cancels).
Prints ToMe/unmerged, then, last, eamvit ToMe / plain ToMe.
Goals: ToMe ≥ 1.4× unmerged; eamvit's merging ≥ 0.95× the plain step.

    python benchmarks/merge_throughput.py [--rounds 5] [--batch-size 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers.attention import Attention
from timm.models.vision_transformer import Block

from eamvit import create_model
from eamvit.experiments.timer import Stats, ratio_stats, time_calls
from eamvit.methods.cost import count_gflops
from eamvit.methods.merge import MergeConfig, merge_, r_for_gmacs
from eamvit.methods.prune import PruneConfig, prune_, unprune_


# ---------------------------------------------------------------- a plain PyTorch ToMe step, for reference

class PlainToMeAttention(Attention):
    """timm's attention with ``log size`` added to the scores; also returns the keys averaged over heads."""

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = None if size is None else size.log().view(B, 1, 1, N)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.transpose(1, 2).reshape(B, N, C)), k.mean(1)


def plain_merge(x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor | None,
                r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of ``x`` (class token first): alternate sets, best match by cosine, weighted mean."""
    B, N, C = x.shape
    r = min(r, (N - 1) // 2)
    with torch.no_grad():
        unit = keys / keys.norm(dim=-1, keepdim=True)
        sim = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)
        sim[:, 0] = -math.inf  # the class token (first of the even set) is never merged
        best, match = sim.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)
        gone, stay = ranked[:, :r], ranked[:, r:].sort(dim=-1).values
        into = match.gather(1, gone)
    size = x.new_ones(B, N) if size is None else size
    both = torch.cat([x * size.unsqueeze(-1), size.unsqueeze(-1)], dim=-1)  # tokens and sizes merge alike
    even, odd = both[:, 0::2], both[:, 1::2]
    pick = lambda t, idx: t.gather(1, idx.unsqueeze(-1).expand(-1, -1, C + 1))
    odd = odd.scatter_add(1, into.unsqueeze(-1).expand(-1, -1, C + 1), pick(even, gone))
    out = torch.cat([pick(even, stay), odd], dim=1)
    return out[..., :C] / out[..., C:], out[..., C]


class PlainToMeBlock(Block):
    """timm's block with a merge between the attention and the MLP; ``tome`` is shared by the model's blocks."""

    tome: dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        info = self.tome
        y, keys = self.attn(self.norm1(x), info["size"])
        x = x + self.drop_path1(self.ls1(y))
        x, info["size"] = plain_merge(x, keys, info["size"], info["r"])
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def plain_tome(model: nn.Module, r: int):
    """A forward function of ``model`` (timm's classes, changed in place) merging ``r`` tokens per block."""
    info = {"r": r, "size": None}
    for blk in model.blocks:
        blk.__class__, blk.attn.__class__, blk.tome = PlainToMeBlock, PlainToMeAttention, info

    def forward(x: torch.Tensor) -> torch.Tensor:
        info["size"] = None
        return model(x)
    return forward


# ---------------------------------------------------------------------------------------------- the run

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = create_model("deit_small_patch16_224").eval()  # random weights
    x = torch.randn(args.batch_size, 3, 224, 224)
    prune_(model, PruneConfig(method="shannon", keep_rate=0.7))
    target = count_gflops(model)
    unprune_(model)
    config, gmacs = r_for_gmacs(model, target)
    r = config.r

    merged = copy.deepcopy(model)
    merge_(merged, MergeConfig(r=r))
    plain = plain_tome(copy.deepcopy(model), r)
    sides = {"unmerged": model, "eamvit ToMe": merged, "plain ToMe": plain}
    with torch.inference_mode():
        diff = (merged(x[:4]) - plain(x[:4])).abs().max().item()
        calls = [(lambda m: lambda: m(x))(m) for m in sides.values()]
        walls = dict(zip(sides, time_calls(calls, warmup=1, reps=args.rounds)))
    print(f"deit_small_patch16_224, batch {args.batch_size}, 224 px, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds [slowest, fastest]")
    print(f"r = {r} per block: {gmacs:.3f} GMACs (entropy pruning κ = 0.7: {target:.3f}; unmerged "
          f"{count_gflops(model):.3f}); eamvit vs plain logits differ by at most {diff:.2e}")
    for name, t in walls.items():
        print(f"  {name:12s} {args.batch_size / Stats.of(t).median:8.2f} images/s "
              f"[{args.batch_size / max(t):.2f}, {args.batch_size / min(t):.2f}]")
    speedup = ratio_stats(walls["unmerged"], walls["eamvit ToMe"])
    plain_speedup = ratio_stats(walls["unmerged"], walls["plain ToMe"])
    print(f"plain ToMe/unmerged {plain_speedup.median:.3f} [{plain_speedup.min:.3f}, {plain_speedup.max:.3f}]")
    print(f"eamvit ToMe/unmerged {speedup.median:.3f} [{speedup.min:.3f}, {speedup.max:.3f}]")
    vs_plain = ratio_stats(walls["plain ToMe"], walls["eamvit ToMe"])
    print(f"eamvit ToMe/plain ToMe {vs_plain.median:.3f}")


if __name__ == "__main__":
    main()
