"""Entropy Attention Map calibration: stream a dataset through an instrumented model.

Memory is bounded by planning the layers into passes before anything is allocated; each pass reads
the whole calibration set in the same order, so the result does not depend on the number of passes.
Under ``torchrun`` each process reads a disjoint shard and the integer histograms are all-reduced,
so the entropies equal those of one process exactly. A long calibration can resume from its
``.partial`` file.

When the data is not a dataset of ``(image, target)`` items (a backbone inside a detection or
segmentation model), ``forward_loop(model)`` runs the model over it instead
(:mod:`eamvit.methods.forward_loop`): its first forward measures the attention shapes, each pass
calls it once (it must feed the same images each time; refused under torchrun), and the
histogram counts widen as images arrive (their number is not known ahead).
"""
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
from eamvit.methods.data import calibration_record, check_records, make_loader, shard
from eamvit.methods.forward_loop import ForwardLoop, check_forward_loop, loop_layer_shapes, run_forward_loop
from eamvit.ops.entropy import AttentionHistogram, check_bits
from eamvit.errors import EamError
from eamvit.io import atomic_path, load_tensors, save_tensors
from eamvit.methods.models import check_attention_shapes, model_spec, num_prefix_tokens, patch_grid

FORMAT = "eamvit-entropy-maps/1"


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def log(msg: str) -> None:
    if dist_info()[0] == 0:
        print(msg, file=sys.stderr, flush=True)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
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


@dataclass
class EntropyMaps:
    """Per-layer entropy (bits), mean attention ``A^μ`` and, for Swin, shifted-window masked entries.

    Every tensor has the layer's attention shape: ``(H, N, N)`` for ViT/DeiT, ``(nW, H, N, N)`` for
    Swin. ``histograms`` (``(2^b, *shape)`` counts) are kept only when asked for (KL maps).
    """

    entropy: list[torch.Tensor]
    mean: list[torch.Tensor]
    masked: list[Optional[torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)
    histograms: Optional[list[torch.Tensor]] = None

    @property
    def num_layers(self) -> int:
        return len(self.entropy)

    def save(self, path: str | os.PathLike) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for l in range(self.num_layers):
            tensors[f"entropy.{l}"] = self.entropy[l]
            tensors[f"mean.{l}"] = self.mean[l]
            if self.masked[l] is not None:
                tensors[f"masked.{l}"] = self.masked[l]
        save_tensors(path, tensors, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EntropyMaps":
        meta, tensors = load_tensors(path, FORMAT, "entropy maps", "compute them with `eamvit calibrate`")
        shapes = _check_maps(path, meta, tensors)
        n = len(shapes)
        return cls(entropy=[tensors[f"entropy.{l}"] for l in range(n)],
                   mean=[tensors[f"mean.{l}"] for l in range(n)],
                   masked=[tensors.get(f"masked.{l}") for l in range(n)], meta=meta)

    def check_model(self, model: nn.Module, source: str = "these maps") -> None:
        """Refuse maps computed on another model (name, kwargs, weights or attention shapes: layers,
        heads, tokens)."""
        spec = model_spec(model)
        theirs = self.meta.get("model", {})
        if not spec.same_model(theirs):
            def show(d):
                ck = d.get("checkpoint_sha256")
                return f"{d.get('name')} {d.get('model_kwargs') or ''}" + (f" checkpoint {ck[:12]}" if ck else "")
            raise EamError(f"{source} were computed for {show(theirs)}, not for {show(spec.to_dict())}; "
                           "recompute them for this model with `eamvit calibrate`")
        if len(attention_layers(model)) != self.num_layers:
            raise EamError(f"{source} have {self.num_layers} layers but the model has {len(attention_layers(model))}")
        check_attention_shapes(model, [tuple(t.shape) for t in self.entropy], source,
                               "recompute them for this model with `eamvit calibrate`")


def _check_maps(path, meta: dict, tensors: dict) -> list[tuple[int, ...]]:
    """The layer shapes of a maps file whose metadata and tensors agree, else one EamError.

    NaN is allowed only for a whole layer left out on purpose (``compute_entropy_maps(layers=...)``).
    """
    bad = lambda why: EamError(f"entropy maps {path} are damaged ({why}); recompute them with `eamvit calibrate`")
    shapes = meta.get("layer_shapes")
    if not isinstance(shapes, list) or not shapes or not all(
            isinstance(s, list) and s and all(isinstance(d, int) and d > 0 for d in s) for s in shapes):
        raise bad("metadata has no valid layer_shapes")
    if meta.get("calibration") is not None:  # maps written before eamvit recorded them have none
        check_records(meta["calibration"], f"entropy maps {path}")
    bits = meta.get("bits")
    expected = {f"{kind}.{l}" for l in range(len(shapes)) for kind in ("entropy", "mean")}
    missing = sorted(expected - set(tensors))
    extra = sorted(k for k in set(tensors) - expected if not k.startswith("masked."))
    if missing or extra:
        raise bad(f"metadata claims {len(shapes)} layers but tensor {(missing or extra)[0]} is "
                  + ("missing" if missing else "not one of them"))
    for key, t in tensors.items():
        kind, _, l = key.partition(".")
        if not l.isdigit() or int(l) >= len(shapes):
            raise bad(f"unexpected tensor {key}")
        want = tuple(shapes[int(l)])
        if kind == "masked":  # one mask per window, shared by the heads
            want = want[:-3] + want[-2:]
        if tuple(t.shape) != want:
            raise bad(f"{key} has shape {tuple(t.shape)}, metadata says {want}")
        if kind == "masked":
            continue
        nan = torch.isnan(t)
        if nan.any() and not (nan.all() and torch.isnan(tensors[f"entropy.{l}"]).all()
                              and torch.isnan(tensors[f"mean.{l}"]).all()):
            raise bad(f"{key} holds NaN")
        ok = t[~nan]
        top = float(bits) if kind == "entropy" and isinstance(bits, int) else 1.0
        if ok.numel() and (not torch.isfinite(ok).all() or ok.min() < -1e-6 or ok.max() > top + 1e-4):
            raise bad(f"{key} has values outside [0, {top:g}]")
    return [tuple(s) for s in shapes]


def plan_passes(shapes: Sequence[tuple[int, ...]], bits: int, max_count: int, layers: Sequence[int],
                max_memory: Optional[int]) -> list[list[int]]:
    """Group consecutive ``layers`` into passes whose accumulators fit in ``max_memory`` bytes."""
    need = {l: AttentionHistogram.nbytes(shapes[l], bits, max_count) for l in layers}
    if max_memory is None:
        return [list(layers)]
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


def _first_sample(dataset: Dataset, indices: Sequence[int]) -> torch.Tensor:
    for i in indices:
        item = dataset[i]
        if item is not None:
            return item[0].unsqueeze(0)
    raise EamError("no readable image in the calibration set")


def _partial_key(meta: dict, indices: Sequence[int], passes: list[list[int]]) -> str:
    h = hashlib.sha256(json.dumps([meta.get("model"), meta.get("bits"), list(indices), passes]).encode())
    return h.hexdigest()


def compute_entropy_maps(
    model: nn.Module,
    dataset: Optional[Dataset] = None,
    *,
    forward_loop: Optional[ForwardLoop] = None,
    indices: Optional[Sequence[int]] = None,
    bits: int = 8,
    batch_size: Optional[int] = None,
    workers: int = 0,
    device: torch.device | str | None = None,
    max_memory: Optional[int] = None,
    layers: Optional[Sequence[int]] = None,
    keep_histograms: bool = False,
    resume_path: Optional[str | os.PathLike] = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    meta: Optional[dict[str, Any]] = None,
) -> EntropyMaps:
    """Entropy Attention Maps of ``model`` over ``dataset`` (EAM eq. 11-13 and the mean of eq. 15).

    Args:
        model: a timm model or any module containing supported attention (a detector around a timm backbone).
        dataset: items ``(image, target)`` (``None`` for an unreadable file, skipped).
        forward_loop: instead of ``dataset``, ``f(model)`` runs ``model`` over the calibration data
            (see the module doc); not with ``indices``, ``batch_size``, ``workers``, ``resume_path``.
        indices: which items, in order (all by default). Under torch.distributed each process takes
            a disjoint shard of them.
        bits: histogram bits b, 2^b bins on [0, 1].
        batch_size: images per forward (default 32).
        workers: DataLoader workers.
        device: where the model and histograms run (the model's device by default).
        max_memory: histogram budget in bytes; above it the layers are split over several passes.
        layers: only these layers (the others get NaN entropy); all by default.
        keep_histograms: keep the raw counts (needed for KL maps).
        resume_path: a ``.partial`` file to checkpoint to every ``checkpoint_every`` batches and to
            resume from when it exists and matches this run.
        progress: show a progress bar.
        meta: extra metadata stored with the maps (transforms, seed, ...).

    Returns:
        :class:`EntropyMaps`.
    """
    check_bits(bits)
    rank, world = dist_info()
    _check_source(dataset, forward_loop, indices, batch_size, workers, resume_path, world)
    batch_size = 32 if batch_size is None else batch_size
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    indices = [] if forward_loop is not None else list(range(len(dataset))) if indices is None else list(indices)
    run = _plan(model, dataset, forward_loop, indices, bits, device, max_memory, layers, meta)
    run.resume_path, run.keep_histograms = resume_path, keep_histograms
    state = _load_partial(resume_path, run.key)
    run.resume_done(state)
    my_indices = shard(indices, rank, world)
    for p in range((state or {}).get("pass", 0), len(run.passes)):
        _run_pass(run, p, state, my_indices, batch_size, workers, checkpoint_every, progress and rank == 0, world)
    if resume_path is not None and Path(resume_path).exists():
        Path(resume_path).unlink()
    return run.maps()


def _check_source(dataset, forward_loop, indices, batch_size, workers, resume_path, world: int) -> None:
    """Refuse no data or two kinds of it, and the options a forward loop or torchrun cannot honour."""
    check_forward_loop(dataset, forward_loop, "a dataset")
    if resume_path is not None and world > 1:
        raise EamError("--resume is not supported under torchrun; run calibration in one process to resume it")
    if forward_loop is None:
        return
    given = [name for name, v in (("indices", indices), ("batch_size", batch_size), ("resume_path", resume_path))
             if v is not None] + (["workers"] if workers else [])
    if given:
        raise EamError(f"{given[0]} applies to a calibration dataset, not to forward_loop (the loop decides "
                       "which images, in which batches); leave it out")
    if world > 1:
        raise EamError("forward_loop calibration runs in one process, not under torchrun; give a dataset to shard")


@dataclass
class _Run:
    """What one calibration carries from pass to pass (and into a ``.partial`` file)."""

    model: nn.Module
    dataset: Optional[Dataset]
    forward_loop: Optional[ForwardLoop]
    device: torch.device
    shapes: list[tuple[int, ...]]
    bits: int
    max_count: int
    passes: list[list[int]]
    meta: dict[str, Any]
    key: str
    resume_path: Optional[str | os.PathLike] = None
    keep_histograms: bool = False
    skipped: int = 0
    seen_images: int = 0
    entropy: list = field(default_factory=list)
    mean: list = field(default_factory=list)
    hists: list = field(default_factory=list)
    masked: list = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.shapes)
        self.entropy, self.mean, self.hists, self.masked = [None] * n, [None] * n, [None] * n, [None] * n

    def resume_done(self, state: Optional[dict]) -> None:
        """Take the finished layers of an interrupted calibration."""
        for l, t in (state or {}).get("done", {}).items():
            self.entropy[l], self.mean[l], self.masked[l] = t["entropy"], t["mean"], t.get("masked")
            if self.keep_histograms:
                self.hists[l] = t["hist"]

    def save_partial(self, p: int, batch: int, acc: dict) -> None:
        _save_partial(self.resume_path, self.key, p, batch, acc, self.entropy, self.mean, self.masked, self.hists,
                      self.skipped)

    def maps(self) -> EntropyMaps:
        """The maps; layers that were not asked for hold NaN."""
        nan = lambda s: torch.full(s, float("nan"))
        self.meta.update(num_images=self.seen_images, skipped_images=self.skipped)
        return EntropyMaps(
            entropy=[e if e is not None else nan(self.shapes[l]) for l, e in enumerate(self.entropy)],
            mean=[m if m is not None else nan(self.shapes[l]) for l, m in enumerate(self.mean)],
            masked=self.masked, meta=self.meta,
            histograms=list(self.hists) if self.keep_histograms else None,
        )


def _plan(model: nn.Module, dataset: Optional[Dataset], forward_loop: Optional[ForwardLoop], indices: list[int],
          bits: int, device: torch.device, max_memory: Optional[int], layers: Optional[Sequence[int]],
          meta: Optional[dict[str, Any]]) -> _Run:
    """Check the request, measure the attention shapes, split the layers into passes, say what it needs."""
    all_layers = attention_layers(model)
    loop = forward_loop is not None
    if not indices and not loop:
        raise EamError("the calibration set is empty; check the folder or --calib-size")
    layers = list(range(len(all_layers))) if layers is None else sorted(set(layers))
    if any(l < 0 or l >= len(all_layers) for l in layers):
        raise EamError(f"layers must be in 0..{len(all_layers) - 1}")
    shapes = (loop_layer_shapes(model, forward_loop) if loop
              else layer_shapes(model, _first_sample(dataset, indices).to(device)))
    # A loop's image count is known only at the end: plan the memory for the widest counts it may need.
    max_count = torch.iinfo(torch.int32).max if loop else len(indices)
    passes = plan_passes(shapes, bits, max_count, layers, max_memory)
    total = sum(AttentionHistogram.nbytes(shapes[l], bits, max_count) for l in layers)
    biggest = max(sum(AttentionHistogram.nbytes(shapes[l], bits, max_count) for l in p) for p in passes)
    log(f"eamvit: histograms need {'at most ' if loop else ''}{format_bytes(total)} for {len(layers)} layers x "
        f"2^{bits} bins; "
        f"{len(passes)} pass(es), at most {format_bytes(biggest)} at once")
    meta = dict(meta or {})
    # A backbone inside a user's model (timm features_only, a detector): the token layout is the backbone's.
    inner = next((m for m in model.modules() if hasattr(m, "patch_embed")), model)
    # The images that calibrated the maps: evaluation skips them (a loop's are not known: data None).
    meta.setdefault("calibration", [calibration_record(forward_loop if loop else dataset, indices or None)])
    meta.update(format=FORMAT, model=model_spec(model).to_dict(), bits=bits,
                layer_shapes=[list(s) for s in shapes], num_prefix_tokens=num_prefix_tokens(inner),
                grid=list(patch_grid(inner) or []) or None)
    return _Run(model=model, dataset=dataset, forward_loop=forward_loop, device=device, shapes=shapes, bits=bits,
                max_count=max_count, passes=passes, meta=meta, key=_partial_key(meta, indices, passes))


def _restore(run: _Run, p: int, state: Optional[dict], acc: dict) -> int:
    """Load the accumulators of an interrupted pass ``p``; returns the batch to resume from."""
    if state is None or state.get("pass") != p or "acc" not in state:
        return 0
    for l, a in state["acc"].items():
        acc[l].counts.copy_(a["counts"])
        acc[l].sum.copy_(a["sum"])
        acc[l].count = a["count"]
        if a.get("masked") is not None:
            run.masked[l] = a["masked"]
    run.skipped = state.get("skipped", 0)
    return state["batch"]


def _run_pass(run: _Run, p: int, state: Optional[dict], my_indices: list[int], batch_size: int, workers: int,
              checkpoint_every: int, progress: bool, world: int) -> None:
    """Count the histograms of the layers of pass ``p`` over this process's images, then finalise them."""
    group = run.passes[p]
    loop = run.forward_loop
    # A loop's counts start narrow and widen as its images arrive (see _observer).
    acc = {l: AttentionHistogram(run.shapes[l], run.bits, 1 if loop else run.max_count, run.device) for l in group}
    start_batch = _restore(run, p, state, acc)
    # Every layer takes the explicit path in every pass (a no-op observer where nothing is
    # counted): fused and explicit attention differ in the last bits, and a layer's input must
    # not depend on which pass it is counted in.
    observers = {l: _ignore for l in range(len(run.shapes))}
    observers.update({l: _observer(acc[l], run.masked, l, grow=loop is not None) for l in group})
    with observe(run.model, observers), torch.inference_mode():
        if loop is not None:
            _check_loop_pass(run, p, acc, run_forward_loop(run.model, loop))
        else:
            _feed(run, p, acc, my_indices[start_batch * batch_size:], start_batch, batch_size, workers,
                  checkpoint_every, progress)
    for l in group:
        a = acc[l]
        if world > 1:
            _all_reduce(a)
        run.entropy[l], run.mean[l] = a.entropy().cpu(), a.mean().cpu()
        if run.keep_histograms:
            run.hists[l] = a.histogram().cpu()
        if run.masked[l] is not None:
            run.masked[l] = run.masked[l].cpu()
        run.seen_images = a.count
    del acc
    if run.resume_path is not None and p + 1 < len(run.passes):
        run.save_partial(p + 1, 0, {})


def _feed(run: _Run, p: int, acc: dict, indices: list[int], start_batch: int, batch_size: int, workers: int,
          checkpoint_every: int, progress: bool) -> None:
    """Run the model over ``indices`` of the dataset, in batches, checkpointing as asked."""
    n_batches = start_batch + math.ceil(len(indices) / batch_size)
    # Same batch boundaries as an uninterrupted run: resume skips whole batches.
    loader = make_loader(run.dataset, indices, batch_size=batch_size, workers=workers)
    bar = tqdm(total=n_batches, initial=start_batch, desc=f"entropy pass {p + 1}/{len(run.passes)}",
               unit="batch", disable=not progress, dynamic_ncols=True)
    for b, batch in enumerate(loader, start=start_batch):
        run.skipped += batch.skipped if p == 0 else 0
        if batch.images.numel():
            run.model(batch.images.to(run.device, non_blocking=True))
        bar.update(1)
        if run.resume_path is not None and (b + 1) % checkpoint_every == 0 and b + 1 < n_batches:
            run.save_partial(p, b + 1, acc)
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


def _ignore(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    return None


def _observer(acc: AttentionHistogram, masked: list, layer: int, grow: bool = False):
    def observe(attn: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        if grow:
            acc.reserve(acc.count + attn.shape[0])
        acc.update(attn)
        if mask is not None and masked[layer] is None:
            masked[layer] = mask < 0
    return observe


def _all_reduce(a: AttentionHistogram) -> None:
    # gloo reduces neither uint8 nor int16: widen for the reduction only.
    counts = a.counts.to(torch.int32)
    dist.all_reduce(counts)
    a.counts = counts.to(torch.int64) if counts.max() > torch.iinfo(a.counts.dtype).max else counts.to(a.counts.dtype)
    dist.all_reduce(a.sum)
    n = torch.tensor([a.count], dtype=torch.int64)
    dist.all_reduce(n)
    a.count = int(n)


def _save_partial(path, key, p, batch, acc, entropy, mean, masked, hists, skipped) -> None:
    done = {l: {"entropy": entropy[l], "mean": mean[l], "masked": masked[l], "hist": hists[l]}
            for l in range(len(entropy)) if entropy[l] is not None}
    state = {"key": key, "pass": p, "batch": batch, "skipped": skipped, "done": done,
             "acc": {l: {"counts": a.counts.cpu(), "sum": a.sum.cpu(), "count": a.count, "masked": masked[l]}
                     for l, a in acc.items()}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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
