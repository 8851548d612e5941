"""Entropy maps: what calibration returns (:class:`EntropyMaps`) and its file."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from eamvit.errors import EamError
from eamvit.io import load_tensors, save_tensors
from eamvit.methods.data import check_records
from eamvit.methods.models import check_attention_shapes, check_same_model
from eamvit.modules.attention import attention_layers

FORMAT = "eamvit-entropy-maps/1"
STATS_KINDS = ("distance", "head_entropy", "renyi")


@dataclass
class EntropyMaps:
    """Per-layer entropy (bits), mean attention ``A^μ`` and, for Swin, shifted-window masked entries, each of
    the layer's attention shape (``(H, N, N)``, Swin ``(nW, H, N, N)``); ``histograms`` (``(2^b, *shape)``
    counts) only when asked for (KL maps). The attention statistics (``None`` when not computed, and per layer
    where a layer does not run over the patch grid): ``distance`` ``(H,)`` in patches, ``head_entropy``
    ``(H,)`` in nats, ``renyi`` ``(len(orders), bins)`` counts on ``[0, log N]`` (``meta["attention_stats"]``).
    """

    entropy: list[torch.Tensor]
    mean: list[torch.Tensor]
    masked: list[Optional[torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)
    histograms: Optional[list[torch.Tensor]] = None
    distance: Optional[list[Optional[torch.Tensor]]] = None
    head_entropy: Optional[list[Optional[torch.Tensor]]] = None
    renyi: Optional[list[Optional[torch.Tensor]]] = None

    @property
    def num_layers(self) -> int:
        return len(self.entropy)

    @property
    def renyi_orders(self) -> tuple[float, ...]:
        """The Rényi orders of ``renyi`` (empty without them)."""
        return tuple(float(a) for a in (self.meta.get("attention_stats") or {}).get("renyi_orders", []))

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"{kind}.{l}": t for kind in ("entropy", "mean", "masked") + STATS_KINDS
                   for l, t in enumerate(getattr(self, kind) or []) if t is not None}
        save_tensors(path, tensors, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EntropyMaps":
        meta, tensors = load_tensors(path, FORMAT, "entropy maps", "compute them with `eamvit calibrate`")
        n, stats_shapes = _check_maps(path, meta, tensors)
        per_layer = lambda kind: [tensors.get(f"{kind}.{l}") for l in range(n)]
        return cls(entropy=per_layer("entropy"), mean=per_layer("mean"), masked=per_layer("masked"), meta=meta,
                   **{k: per_layer(k) if stats_shapes[k] is not None else None for k in STATS_KINDS})

    def check_model(self, model: nn.Module, source: str = "these maps") -> None:
        """Refuse maps computed on another model (name, kwargs, weights, or attention layers, heads, tokens)."""
        check_same_model(model, self.meta.get("model"), f"{source} were computed",
                         "recompute them for this model with `eamvit calibrate`")
        if len(attention_layers(model)) != self.num_layers:
            raise EamError(f"{source} have {self.num_layers} layers but the model has {len(attention_layers(model))}")
        check_attention_shapes(model, [tuple(t.shape) for t in self.entropy], source,
                               "recompute them for this model with `eamvit calibrate`")


def _check_maps(path, meta: dict, tensors: dict) -> tuple[int, dict[str, Optional[tuple[int, ...]]]]:
    """``(layers, statistics shapes)`` of a maps file whose metadata and tensors agree, else one EamError; NaN
    only for a whole layer left out on purpose (``CalibOptions.layers``)."""
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
    extra = sorted(k for k in set(tensors) - expected if k.partition(".")[0] not in ("masked",) + STATS_KINDS)
    if missing or extra:
        raise bad(f"metadata claims {len(shapes)} layers but tensor {(missing or extra)[0]} is "
                  + ("missing" if missing else "not one of them"))
    stats_shapes = _stats_shapes(meta, tensors, bad)
    for key, t in tensors.items():
        kind, _, l = key.partition(".")
        if not l.isdigit() or int(l) >= len(shapes):
            raise bad(f"unexpected tensor {key}")
        if kind in STATS_KINDS:
            _check_stat(key, t, tuple(shapes[int(l)]), stats_shapes[kind], bad)
            continue
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
    return len(shapes), stats_shapes


def _stats_shapes(meta: dict, tensors: dict, bad) -> dict[str, Optional[tuple[int, ...]]]:
    """What ``meta["attention_stats"]`` says the statistics tensors are: per kind, the shape of ``renyi``
    (``()`` for the per-head kinds), or ``None`` where the file must not hold that kind."""
    stats = meta.get("attention_stats")
    present = {k.partition(".")[0] for k in tensors} & set(STATS_KINDS)
    if stats is None:
        if present:
            raise bad(f"it holds {sorted(present)[0]} tensors but no attention_stats metadata")
        return dict.fromkeys(STATS_KINDS)
    shape_error = bad("attention_stats metadata is not {distance, renyi_orders, renyi_bins}")
    if not isinstance(stats, dict):
        raise shape_error
    orders, bins = stats.get("renyi_orders", []), stats.get("renyi_bins", 0)
    try:
        orders = [float(a) for a in orders]
    except (TypeError, ValueError):
        raise shape_error from None
    if (not isinstance(stats.get("distance"), bool) or not isinstance(bins, int)
            or any(math.isnan(a) or a < 0 for a in orders) or (orders and bins <= 0)):
        raise shape_error
    distance = () if stats["distance"] else None
    return {"distance": distance, "head_entropy": distance, "renyi": (len(orders), bins) if orders else None}


def _check_stat(key: str, t: torch.Tensor, layer_shape: tuple[int, ...], stat_shape: Optional[tuple[int, ...]],
                bad) -> None:
    """One statistics tensor against its layer and ``meta["attention_stats"]``."""
    kind = key.partition(".")[0]
    if stat_shape is None:
        raise bad(f"{key} is not among the attention statistics its metadata names")
    want = stat_shape if kind == "renyi" else (layer_shape[-3],)
    if tuple(t.shape) != want:
        raise bad(f"{key} has shape {tuple(t.shape)}, metadata says {want}")
    if kind == "renyi":
        if t.is_floating_point() or t.dtype == torch.bool or (t.numel() and t.min() < 0):
            raise bad(f"{key} is not a table of counts")
        return
    top = math.log(layer_shape[-1]) + 1e-4 if kind == "head_entropy" else math.inf
    if t.numel() and (not torch.isfinite(t).all() or t.min() < -1e-6 or t.max() > top):
        raise bad(f"{key} has values outside [0, {top:g}]")
