"""Histograms, Shannon entropy, means and KL divergence of attention entries (EAM eq. 12-14), and
:class:`AttentionHistogram`, the streaming accumulator for one layer. See docs/architecture-core.md."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

from eamvit.errors import EamError

MAX_BITS = 16


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise EamError(f"histogram bits b={bits} is out of range; use an integer in 1..{MAX_BITS} (paper: 8)")
    return bits


def count_dtype(max_count: int) -> torch.dtype:
    """Smallest integer dtype that can hold ``max_count`` (counts per bin never exceed M)."""
    return next(t for t in (torch.uint8, torch.int16, torch.int32, torch.int64) if max_count <= torch.iinfo(t).max)


def histogram_bins(attn: torch.Tensor, bits: int) -> torch.Tensor:
    """Bin index of each value on ``[0, 1]`` split into ``2^bits`` equal bins; 1.0 falls in the last."""
    nb = 1 << bits
    return (attn * nb).to(torch.int32 if nb * 2 < 2**31 else torch.int64).clamp_(0, nb - 1)


def entropy_from_counts(counts: torch.Tensor, total: int, chunk: int = 32) -> torch.Tensor:
    """Shannon entropy in bits of histograms ``counts`` ``(2^b, ...)`` over ``total`` samples.

    Attention histograms are mostly empty bins, and only counts of 2 or more contribute, so only those
    are gathered, a few bins at a time.
    """
    if total <= 0:
        raise EamError("no calibration images were seen; check the calibration folder or --calib-size")
    c = torch.arange(total + 1, dtype=torch.float64, device=counts.device)
    table = c * torch.log2(c.clamp_min(1))
    flat = counts.reshape(counts.shape[0], -1)
    acc = torch.zeros(flat.shape[1], dtype=torch.float64, device=counts.device)
    for part in flat.split(chunk):
        bins, entries = (part > 1).nonzero(as_tuple=True)
        acc.index_add_(0, entries, table[part[bins, entries].long()])
    return (math.log2(total) - acc / total).clamp_min_(0.0).view(counts.shape[1:])


def kl_from_counts(p_counts: torch.Tensor, q_counts: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``D_KL(p || q)`` in bits per entry from two histograms ``(2^b, ...)`` (EAM eq. 14); ``eps`` in every
    bin keeps a bin ``q`` never saw finite."""
    p, q = (c.to(torch.float64) + eps for c in (p_counts, q_counts))
    p, q = p / p.sum(0, keepdim=True), q / q.sum(0, keepdim=True)
    return (p * (torch.log2(p) - torch.log2(q))).sum(0)


class Scratch:
    """Work buffers and at most ``threads`` helper threads (``None``: ``torch.get_num_threads()``) shared
    by the histograms of one calibration pass (see docs/architecture-core.md)."""

    def __init__(self, threads: Optional[int] = None) -> None:
        self.threads = threads
        self._buffers: dict[str, torch.Tensor] = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self._workers = 0

    def buffer(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D tensor of ``n`` elements, reused from call to call (its content is left over)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]

    def parts(self, n: int, min_part: int = 1 << 16) -> int:
        """How many threads should share ``n`` units of scatter work (each at least ``min_part``)."""
        return max(1, min(self.threads or torch.get_num_threads(), n // min_part))

    def run(self, fn: Callable[[int], None], parts: int) -> None:
        """``fn(0)``, ..., ``fn(parts - 1)`` at the same time; part 0 on the calling thread."""
        if parts > 1 and self._workers < parts - 1:
            self._stop()
            self._pool, self._workers = ThreadPoolExecutor(parts - 1, thread_name_prefix="eamvit-histogram"), parts - 1
        futures = [self._pool.submit(fn, i) for i in range(1, parts)] if parts > 1 else []
        try:
            fn(0)
        finally:
            for f in futures:  # every part finishes before the buffers are reused; the first error is raised
                f.result()

    def close(self) -> None:
        """Stop the threads and free the buffers (a later call starts them again)."""
        self._stop()
        self._buffers.clear()

    def _stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._workers = None, 0


class AttentionHistogram:
    """Streaming histogram (``2^bits`` bins on [0, 1]) and running sum of one layer's attention entries
    of per-image ``shape``; ``max_count``, the most images that will be added, picks the count dtype."""

    def __init__(self, shape: tuple[int, ...], bits: int, max_count: int, device: torch.device | str = "cpu",
                 scratch: Optional[Scratch] = None):
        self.shape = tuple(shape)
        self.bits = check_bits(bits)
        self.numel = math.prod(self.shape)
        nb = 1 << bits
        self.counts = torch.zeros(nb * self.numel, dtype=count_dtype(max_count), device=device)
        self.sum = torch.zeros(self.numel, dtype=torch.float64, device=device)
        self.count = 0
        self.scratch = scratch if scratch is not None else Scratch()
        self._index_dtype = torch.int32 if nb * self.numel < 2**31 else torch.int64
        self._offsets = torch.arange(self.numel, dtype=self._index_dtype, device=device)
        self._one = torch.ones(1, dtype=self.counts.dtype, device=device)

    @staticmethod
    def nbytes(shape: tuple[int, ...], bits: int, max_count: int) -> int:
        """Memory one accumulator needs, to plan multi-pass calibration before allocating."""
        n = math.prod(shape)
        per_count = torch.empty((), dtype=count_dtype(max_count)).element_size()
        return n * (1 << bits) * per_count + n * 8

    def reserve(self, max_count: int) -> None:
        """Widen the counts, when needed, to hold ``max_count`` images (a stream of unknown length)."""
        dtype = count_dtype(max_count)
        if torch.iinfo(dtype).max > torch.iinfo(self.counts.dtype).max:
            self.counts = self.counts.to(dtype)
            self._one = torch.ones(1, dtype=dtype, device=self.counts.device)

    def update(self, attn: torch.Tensor) -> None:
        """Add a batch ``(B, *shape)`` of attention maps."""
        if tuple(attn.shape[1:]) != self.shape:
            raise EamError(f"attention shape {tuple(attn.shape[1:])} does not match the calibrated {self.shape}; "
                           "use the same image size for calibration and evaluation")
        flat = attn.detach().reshape(attn.shape[0], self.numel)
        if self._index_dtype == torch.int32 and flat.device.type == "cpu":
            self._count_rows(flat)
        else:  # one scatter: a GPU's index_add_ is parallel; int64 indices only for maps past 2^31 counts
            idx = histogram_bins(flat, self.bits).to(self._index_dtype).mul_(self.numel).add_(self._offsets)
            self.counts.index_add_(0, idx.view(-1), self._one.expand(idx.numel()))
        # float32 within a batch, float64 across batches: exact enough, and no float64 copy of A.
        self.sum += flat.sum(0)
        self.count += attn.shape[0]

    def _count_rows(self, flat: torch.Tensor) -> None:
        """Add the ``(B, numel)`` maps to the counts row by row: :func:`histogram_bins` in place in the
        scratch buffers, flat index ``bin * numel + entry``, laid out ``(rows, B, keys)``."""
        B, nb = flat.shape[0], 1 << self.bits
        keys = self.shape[-1]
        rows = self.numel // keys
        by_row = flat.view(B, rows, keys).transpose(0, 1)
        scaled = self.scratch.buffer("scaled", flat.numel(), flat.dtype, flat.device).view(rows, B, keys)
        torch.mul(by_row, nb, out=scaled)
        idx = self.scratch.buffer("index", flat.numel(), torch.int32, flat.device).view(rows, B, keys)
        idx.copy_(scaled).clamp_(0, nb - 1)  # copy_ truncates as .to() does
        torch.add(self._offsets.view(rows, 1, keys), idx, alpha=self.numel, out=idx)
        # Threads take disjoint rows, so no two of them ever add to the same count.
        parts = self.scratch.parts(flat.numel())
        bounds = [rows * i // parts for i in range(parts + 1)]

        def count(i: int) -> None:
            part = idx[bounds[i]:bounds[i + 1]].reshape(-1)
            self.counts.index_add_(0, part, self._one.expand(part.numel()))

        self.scratch.run(count, parts)

    def histogram(self) -> torch.Tensor:
        """Counts as ``(2^b, *shape)``."""
        return self.counts.view((1 << self.bits,) + self.shape)

    def entropy(self) -> torch.Tensor:
        return entropy_from_counts(self.histogram(), self.count).to(torch.float32)

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise EamError("no calibration images were seen; check the calibration folder or --calib-size")
        return (self.sum / self.count).view(self.shape).to(torch.float32)


def mean_entropy_per_head(entropy: list[torch.Tensor]) -> torch.Tensor:
    """``(L, H_max)`` mean entropy of each head (NaN where a layer has fewer heads, as in Swin)."""
    heads = [e.shape[-3] for e in entropy]
    out = torch.full((len(entropy), max(heads)), float("nan"))
    for l, e in enumerate(entropy):
        out[l, : heads[l]] = e.transpose(0, -3).reshape(heads[l], -1).mean(1) if e.dim() == 4 else e.flatten(1).mean(1)
    return out


def cls_row(maps: list[torch.Tensor], layer: int, num_prefix: int = 1) -> Optional[torch.Tensor]:
    """Row of the CLS token over the patch tokens, ``(H, N - num_prefix)``; ``None`` for Swin (no CLS)."""
    return maps[layer][:, 0, num_prefix:] if maps[layer].dim() == 3 else None
