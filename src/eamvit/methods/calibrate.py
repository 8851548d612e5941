"""Entropy Attention Map calibration: stream a dataset (or a ``forward_loop``) through an instrumented model,
in as many passes as memory needs, over disjoint shards under ``torchrun``, with the same maps either way."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from eamvit.modules.attention import attention_layers, layer_shapes, observe
from eamvit.methods.data import (ForwardLoop, calibration_record, check_forward_loop, make_loader, readable_items,
                                 run_first_forward, run_forward_loop, shard)
from eamvit.methods.maps import FORMAT, EntropyMaps
from eamvit.ops.attention_stats import RENYI_BINS, AttentionStats, check_orders, format_order, patch_prefix
from eamvit.ops.entropy import AttentionHistogram, Scratch, check_bits
from eamvit.errors import EamError
from eamvit.io import atomic_path
from eamvit.methods.models import model_spec, num_prefix_tokens, patch_grid

__all__ = ["FORMAT", "CalibOptions", "EntropyMaps", "compute_entropy_maps", "dist_info", "format_bytes",
           "parse_bytes", "plan_passes"]


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def log(msg: str) -> None:
    if dist_info()[0] == 0:
        print(msg, file=sys.stderr, flush=True)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5GiB"`` or a plain number of bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        raise EamError(f"cannot read memory size {text!r}; write e.g. 512M or 4G") from None


def plan_passes(shapes: Sequence[tuple[int, ...]], bits: int, max_count: int, layers: Sequence[int],
                max_memory: Optional[int]) -> list[list[int]]:
    """Group consecutive ``layers`` into passes whose accumulators fit in ``max_memory`` bytes."""
    if max_memory is None:
        return [list(layers)]
    need = {l: AttentionHistogram.nbytes(shapes[l], bits, max_count) for l in layers}
    passes: list[list[int]] = [[]]
    used = 0
    for l in layers:
        if need[l] > max_memory:
            raise EamError(f"layer {l} alone needs {format_bytes(need[l])} of histograms, more than --max-memory "
                           f"{format_bytes(max_memory)}; raise --max-memory or lower --bits")
        if used + need[l] > max_memory and passes[-1]:
            passes.append([])
            used = 0
        passes[-1].append(l)
        used += need[l]
    return passes


def _partial_key(meta: dict, indices: Sequence[int], passes: list[list[int]]) -> str:
    parts = [meta.get("model"), meta.get("bits"), list(indices), passes]
    if meta.get("attention_stats"):  # only then: a checkpoint of a run without them keeps its key
        parts.append(meta["attention_stats"])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass(frozen=True)
class CalibOptions:
    """The settings of :func:`compute_entropy_maps` beyond its images and bits (``eamvit calibrate``'s flags).

    Args:
        device: where the model and histograms run (the model's device by default).
        max_memory: histogram budget in bytes; above it the layers are split over several passes.
        layers: only these layers (the others get NaN entropy); all by default.
        keep_histograms: keep the raw counts (needed for KL maps).
        resume_path: a ``.partial`` file to checkpoint to (every ``checkpoint_every`` batches) and resume from.
        meta: extra metadata stored with the maps (transforms, seed, ...).
        distance: also measure each head's mean attention distance and row entropy (Rényi pruning paper,
            Fig. 6), in the layers that attend over prefix tokens and the whole patch grid.
        renyi_orders: also count per-token Rényi entropy histograms of these orders (Fig. 5), in those layers.
    """

    workers: int = 0
    device: torch.device | str | None = None
    max_memory: Optional[int] = None
    layers: Optional[Sequence[int]] = None
    keep_histograms: bool = False
    resume_path: Optional[str | os.PathLike] = None
    checkpoint_every: int = 50
    meta: Optional[dict[str, Any]] = None
    distance: bool = False
    renyi_orders: Sequence[float] = ()


def compute_entropy_maps(model: nn.Module, dataset: Optional[Dataset] = None, *,
                         forward_loop: Optional[ForwardLoop] = None, indices: Optional[Sequence[int]] = None,
                         bits: int = 8, batch_size: Optional[int] = None, progress: bool = True,
                         options: CalibOptions = CalibOptions()) -> EntropyMaps:
    """Entropy Attention Maps of ``model`` over ``dataset`` (EAM eq. 11-13 and the mean of eq. 15).

    Args:
        model: a timm model or any module containing supported attention (a detector around a timm backbone).
        dataset: items ``(image, target)`` (``None`` for an unreadable file, skipped).
        forward_loop: instead of ``dataset``, ``f(model)`` runs ``model`` over the calibration data, the
            same images at every call (one call per pass); not with ``indices``, ``batch_size``,
            ``workers``, ``resume_path`` or torchrun.
        indices: which items, in order (all by default; under torch.distributed, a disjoint shard each).
        bits: histogram bits b, 2^b bins on [0, 1].
        batch_size: images per forward (default 32).
    """
    rank, world = dist_info()
    _check_source(dataset, forward_loop, indices, batch_size, options, world)
    device = torch.device(options.device) if options.device is not None else next(model.parameters()).device
    model.to(device).eval()
    indices = [] if forward_loop is not None else list(range(len(dataset))) if indices is None else list(indices)
    run = _plan(model, dataset, forward_loop, indices, bits, device, options)
    run.batch_size, run.progress, run.world = 32 if batch_size is None else batch_size, progress and rank == 0, world
    state = _load_partial(options.resume_path, run.key)
    run.resume_done(state)
    my_indices = shard(indices, rank, world)
    for p in range((state or {}).get("pass", 0), len(run.passes)):
        _run_pass(run, p, state, my_indices)
    if options.resume_path is not None and Path(options.resume_path).exists():
        Path(options.resume_path).unlink()
    return run.maps()


def _check_source(dataset, forward_loop, indices, batch_size, options: CalibOptions, world: int) -> None:
    """Refuse no data or two kinds of it, and the options a forward loop or torchrun cannot honour."""
    check_forward_loop(dataset, forward_loop, "a dataset")
    if options.resume_path is not None and world > 1:
        raise EamError("--resume is not supported under torchrun; run calibration in one process to resume it")
    if forward_loop is None:
        return
    given = [name for name, v in (("indices", indices), ("batch_size", batch_size),
                                  ("resume_path", options.resume_path)) if v is not None]
    if given or options.workers:
        raise EamError(f"{(given or ['workers'])[0]} applies to a calibration dataset, not to forward_loop (the loop "
                       "decides which images, in which batches); leave it out")
    if world > 1:
        raise EamError("forward_loop calibration runs in one process, not under torchrun; give a dataset to shard")


@dataclass
class _Run:
    """What one calibration carries from pass to pass (and into a ``.partial`` file)."""

    model: nn.Module
    dataset: Optional[Dataset]
    forward_loop: Optional[ForwardLoop]
    options: CalibOptions
    device: torch.device
    shapes: list[tuple[int, ...]]
    bits: int
    max_count: int
    passes: list[list[int]]
    meta: dict[str, Any]
    key: str
    batch_size: int = 32
    progress: bool = True
    world: int = 1
    skipped: int = 0
    seen_images: int = 0
    entropy: list = field(default_factory=list)
    mean: list = field(default_factory=list)
    hists: list = field(default_factory=list)
    masked: list = field(default_factory=list)
    # Attention statistics: layer -> its prefix tokens (the layers measured), and per layer the results.
    stats_layers: dict = field(default_factory=dict)
    stats: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("entropy", "mean", "hists", "masked", "stats"):
            setattr(self, name, [None] * len(self.shapes))

    def resume_done(self, state: Optional[dict]) -> None:
        """Take the finished layers of an interrupted calibration."""
        for l, t in (state or {}).get("done", {}).items():
            self.entropy[l], self.mean[l], self.masked[l] = t["entropy"], t["mean"], t.get("masked")
            self.stats[l] = t.get("stats")
            if self.options.keep_histograms:
                self.hists[l] = t["hist"]

    def save_partial(self, p: int, batch: int, acc: dict, stats: Optional[dict] = None) -> None:
        stats = stats or {}
        done = {l: {"entropy": self.entropy[l], "mean": self.mean[l], "masked": self.masked[l],
                    "hist": self.hists[l], "stats": self.stats[l]}
                for l in range(len(self.entropy)) if self.entropy[l] is not None}
        state = {"key": self.key, "pass": p, "batch": batch, "skipped": self.skipped, "done": done,
                 "acc": {l: {"counts": a.counts.cpu(), "sum": a.sum.cpu(), "count": a.count, "masked": self.masked[l],
                             "stats": {k: v.cpu() for k, v in stats[l].state().items()} if l in stats else None}
                         for l, a in acc.items()}}
        with atomic_path(self.options.resume_path) as tmp:
            torch.save(state, tmp)

    def new_stats(self, layers: Sequence[int]) -> dict[int, AttentionStats]:
        """Fresh accumulators of the attention statistics of those ``layers`` that are measured."""
        spec = self.meta.get("attention_stats") or {}
        grid = tuple(self.meta["grid"]) if spec.get("distance") else None
        return {l: AttentionStats(self.shapes[l][0], self.shapes[l][-1], self.stats_layers[l], grid,
                                  [float(a) for a in spec.get("renyi_orders", [])], spec.get("renyi_bins", RENYI_BINS),
                                  self.device)
                for l in layers if l in self.stats_layers}

    def maps(self) -> EntropyMaps:
        """The maps; layers that were not asked for hold NaN."""
        nan = lambda s: torch.full(s, float("nan"))
        self.meta.update(num_images=self.seen_images, skipped_images=self.skipped)
        spec = self.meta.get("attention_stats") or {}
        stat = lambda kind: [None if s is None else s[kind] for s in self.stats]
        return EntropyMaps(
            entropy=[e if e is not None else nan(self.shapes[l]) for l, e in enumerate(self.entropy)],
            mean=[m if m is not None else nan(self.shapes[l]) for l, m in enumerate(self.mean)],
            masked=self.masked, meta=self.meta,
            histograms=list(self.hists) if self.options.keep_histograms else None,
            distance=stat("distance") if spec.get("distance") else None,
            head_entropy=stat("head_entropy") if spec.get("distance") else None,
            renyi=stat("renyi") if spec.get("renyi_orders") else None,
        )


def _plan(model: nn.Module, dataset: Optional[Dataset], forward_loop: Optional[ForwardLoop], indices: list[int],
          bits: int, device: torch.device, options: CalibOptions) -> _Run:
    """Check the request, measure the attention shapes, split the layers into passes, say what it needs."""
    check_bits(bits)
    orders = check_orders(options.renyi_orders)
    all_layers = attention_layers(model)
    loop = forward_loop is not None
    if not indices and not loop:
        raise EamError("the calibration set is empty; check the folder or --calib-size")
    layers = list(range(len(all_layers))) if options.layers is None else sorted(set(options.layers))
    if any(l < 0 or l >= len(all_layers) for l in layers):
        raise EamError(f"layers must be in 0..{len(all_layers) - 1}")
    first = [] if loop else readable_items(dataset, indices, 1)
    if not loop and not first:
        raise EamError("no readable image in the calibration set")
    # A loop's shapes are those of its first forward (the loop is stopped there).
    sample = (lambda: run_first_forward(model, forward_loop)) if loop else first[0][0].unsqueeze(0).to(device)
    shapes = layer_shapes(model, sample)
    # A loop's image count is known only at the end: plan the memory for the widest counts it may need.
    max_count = torch.iinfo(torch.int32).max if loop else len(indices)
    passes = plan_passes(shapes, bits, max_count, layers, options.max_memory)
    total = sum(AttentionHistogram.nbytes(shapes[l], bits, max_count) for l in layers)
    biggest = max(sum(AttentionHistogram.nbytes(shapes[l], bits, max_count) for l in p) for p in passes)
    log(f"eamvit: histograms need {'at most ' if loop else ''}{format_bytes(total)} for {len(layers)} layers x "
        f"2^{bits} bins; {len(passes)} pass(es), at most {format_bytes(biggest)} at once")
    meta = dict(options.meta or {})
    # A backbone inside a user's model (timm features_only, a detector): the token layout is the backbone's.
    inner = next((m for m in model.modules() if hasattr(m, "patch_embed")), model)
    # The images that calibrated the maps: evaluation skips them (a loop's are not known: data None).
    meta.setdefault("calibration", [calibration_record(forward_loop if loop else dataset, indices or None)])
    meta.update(format=FORMAT, model=model_spec(model).to_dict(), bits=bits,
                layer_shapes=[list(s) for s in shapes], num_prefix_tokens=num_prefix_tokens(inner),
                grid=list(patch_grid(inner) or []) or None)
    stats_layers = _plan_stats(type(model).__name__, shapes, layers, meta, options.distance, orders)
    return _Run(model=model, dataset=dataset, forward_loop=forward_loop, options=options, device=device,
                shapes=shapes, bits=bits, max_count=max_count, passes=passes, meta=meta,
                key=_partial_key(meta, indices, passes), stats_layers=stats_layers)


def _plan_stats(name: str, shapes: list[tuple[int, ...]], layers: list[int], meta: dict, distance: bool,
                orders: tuple[float, ...]) -> dict[int, int]:
    """The layers whose attention statistics are measured (layer -> its prefix tokens); records what is
    measured in ``meta["attention_stats"]``. Refuses a model where no layer runs over the patch grid."""
    if not distance and not orders:
        return {}
    prefix = {l: patch_prefix(shapes[l], meta.get("grid"), meta.get("num_prefix_tokens", 0)) for l in layers}
    measured = {l: p for l, p in prefix.items() if p is not None}
    if not measured:
        raise EamError(f"the attention distance and the Rényi entropy histograms need attention over the whole "
                       f"patch grid (ViT-like layers, as token pruning); no layer of {name} has it (layer "
                       f"{layers[0]}: attention shape {shapes[layers[0]]}); calibrate without --distance and "
                       "--renyi-orders")
    left = [l for l in layers if l not in measured]
    if left:
        log(f"eamvit: attention statistics leave out layer{'s' if len(left) > 1 else ''} "
            f"{', '.join(map(str, left))}: not attention over the whole patch grid")
    meta["attention_stats"] = {"distance": distance, "renyi_bins": RENYI_BINS,
                               "renyi_orders": [format_order(a) if math.isinf(a) else a for a in orders]}
    return measured


def _restore(run: _Run, p: int, state: Optional[dict], acc: dict, stats: dict) -> int:
    """Load the accumulators of an interrupted pass ``p``; returns the batch to resume from."""
    if state is None or state.get("pass") != p or "acc" not in state:
        return 0
    for l, a in state["acc"].items():
        acc[l].counts.copy_(a["counts"])
        acc[l].sum.copy_(a["sum"])
        acc[l].count = a["count"]
        if a.get("masked") is not None:
            run.masked[l] = a["masked"]
        if l in stats:
            stats[l].load_state(a["stats"])
    run.skipped = state.get("skipped", 0)
    return state["batch"]


def _run_pass(run: _Run, p: int, state: Optional[dict], my_indices: list[int]) -> None:
    """Count the histograms of the layers of pass ``p`` over this process's images, then finalise them."""
    group = run.passes[p]
    loop = run.forward_loop
    # A loop's counts start narrow and widen as its images arrive (see _observer). The layers count one
    # after the other, so they share one set of work buffers and helper threads (stopped after the pass).
    scratch = Scratch()
    acc = {l: AttentionHistogram(run.shapes[l], run.bits, 1 if loop else run.max_count, run.device, scratch)
           for l in group}
    stats = run.new_stats(group)
    start_batch = _restore(run, p, state, acc, stats)
    # Every layer takes the explicit path in every pass (a no-op observer where nothing is
    # counted): fused and explicit attention differ in the last bits, and a layer's input must
    # not depend on which pass it is counted in.
    observers = dict.fromkeys(range(len(run.shapes)), lambda attn, mask: None)
    observers.update({l: _observer(acc[l], run.masked, l, grow=loop is not None, stats=stats.get(l)) for l in group})
    try:
        with observe(run.model, observers), torch.inference_mode():
            if loop is not None:
                _check_loop_pass(run, p, acc, run_forward_loop(run.model, loop))
            else:
                _feed(run, p, acc, stats, my_indices[start_batch * run.batch_size:], start_batch)
    finally:
        scratch.close()
    for l in group:
        a = acc[l]
        if run.world > 1:
            _all_reduce(a, stats.get(l))
        run.entropy[l], run.mean[l] = a.entropy().cpu(), a.mean().cpu()
        if l in stats:
            run.stats[l] = stats[l].result()
        if run.options.keep_histograms:
            run.hists[l] = a.histogram().cpu()
        if run.masked[l] is not None:
            run.masked[l] = run.masked[l].cpu()
        run.seen_images = a.count
    del acc
    if run.options.resume_path is not None and p + 1 < len(run.passes):
        run.save_partial(p + 1, 0, {})


def _feed(run: _Run, p: int, acc: dict, stats: dict, indices: list[int], start_batch: int) -> None:
    """Run the model over ``indices`` of the dataset, in batches, checkpointing as asked."""
    n_batches = start_batch + math.ceil(len(indices) / run.batch_size)
    # Same batch boundaries as an uninterrupted run: resume skips whole batches.
    loader = make_loader(run.dataset, indices, batch_size=run.batch_size, workers=run.options.workers)
    bar = tqdm(total=n_batches, initial=start_batch, desc=f"entropy pass {p + 1}/{len(run.passes)}",
               unit="batch", disable=not run.progress, dynamic_ncols=True)
    every = run.options.checkpoint_every
    for b, batch in enumerate(loader, start=start_batch):
        run.skipped += batch.skipped if p == 0 else 0
        if batch.images.numel():
            run.model(batch.images.to(run.device, non_blocking=True))
        bar.update(1)
        if run.options.resume_path is not None and (b + 1) % every == 0 and b + 1 < n_batches:
            run.save_partial(p, b + 1, acc, stats)
    bar.close()


def _check_loop_pass(run: _Run, p: int, acc: dict, forwards: int) -> None:
    """Refuse a forward loop that fed its layers, or its passes, different numbers of images."""
    counts = {a.count for a in acc.values()}
    if len(counts) > 1:
        raise EamError(f"forward_loop ran some attention layers on more images than others ({sorted(counts)}); "
                       "every attention layer must run on every forward")
    count = counts.pop()
    if p > 0 and count != run.seen_images:
        raise EamError(f"forward_loop fed {run.seen_images} images in pass 1 and {count} in pass {p + 1}; it must "
                       "feed the same images each time it is called")
    log(f"eamvit: entropy pass {p + 1}/{len(run.passes)}: {forwards} forwards, {count} images")


def _observer(acc: AttentionHistogram, masked: list, layer: int, grow: bool = False,
              stats: Optional[AttentionStats] = None):
    def observe(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        if grow:
            acc.reserve(acc.count + attn.shape[0])
        acc.update(attn)
        if stats is not None:
            stats.update(attn)
        if mask is not None and masked[layer] is None:
            masked[layer] = mask < 0
    return observe


def _all_reduce(a: AttentionHistogram, stats: Optional[AttentionStats] = None) -> None:
    # gloo reduces neither uint8 nor int16: widen for the reduction only.
    counts = a.counts.to(torch.int32)
    dist.all_reduce(counts)
    a.counts = counts.to(torch.int64) if counts.max() > torch.iinfo(a.counts.dtype).max else counts.to(a.counts.dtype)
    dist.all_reduce(a.sum)
    n = torch.tensor([a.count], dtype=torch.int64)
    dist.all_reduce(n)
    a.count = int(n)
    if stats is not None:
        state = stats.state()
        for t in state.values():
            dist.all_reduce(t)
        stats.load_state(state)


def _load_partial(path, key) -> Optional[dict]:
    if path is None or not Path(path).exists():
        return None
    if Path(path).is_dir():
        raise EamError(f"resume file {path} is a folder; remove it or use another --out")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise EamError(f"cannot read resume file {path}; delete it to start the calibration afresh") from None
    if not isinstance(state, dict) or not {"key", "pass", "batch", "done"} <= set(state):
        raise EamError(f"resume file {path} is not an eamvit calibration checkpoint; delete it to start afresh")
    if state.get("key") != key:
        raise EamError(f"resume file {path} belongs to another calibration (model, bits, images or passes differ); "
                       "delete it or use another --out")
    log(f"eamvit: resuming calibration from {path} (pass {state['pass'] + 1}, batch {state['batch']})")
    return state
