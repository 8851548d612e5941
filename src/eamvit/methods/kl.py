"""KL divergence maps between a full-precision and a quantized model (EAM §4.3, eq. 14, Fig. 4): for every
attention entry, ``D_KL(p_fp32 ‖ p_q)`` in bits between its histograms over the same images in the two models.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from eamvit.methods.state import step_config
from eamvit.methods.calibrate import CalibOptions, EntropyMaps, compute_entropy_maps
from eamvit.io import save_tensors
from eamvit.ops.entropy import kl_from_counts
from eamvit.errors import EamError

KL_EPS = 1e-6


def kl_maps(p_hists: Sequence[torch.Tensor], q_hists: Sequence[torch.Tensor],
            eps: float = KL_EPS) -> list[torch.Tensor]:
    """Per-layer ``D_KL(p ‖ q)`` maps (bits) from histograms ``(2^b, *layer_shape)`` of the reference and the
    quantized model over the same images; ``eps`` is added to every bin of both before normalising, so a bin
    the quantized model never fills costs a large but finite amount."""
    if len(p_hists) != len(q_hists):
        raise EamError(f"the two models have {len(p_hists)} and {len(q_hists)} attention layers; "
                       "compare the same model")
    for l, (p, q) in enumerate(zip(p_hists, q_hists)):
        if p is None or q is None:
            raise EamError(f"layer {l} has no histogram; compute the maps with keep_histograms=True")
        if p.shape != q.shape:
            raise EamError(f"layer {l}: histograms {tuple(p.shape)} and {tuple(q.shape)} differ; use the same bits "
                           "and image size for both models")
    return [kl_from_counts(p, q, eps).to(torch.float32) for p, q in zip(p_hists, q_hists)]


@dataclass
class KLMaps:
    """Per-layer KL maps (bits, the layer's attention shape) with the entropy maps of the full-precision
    (``fp``) and the quantized model (``quant``) they came from."""

    kl: list[torch.Tensor]
    fp: Optional[EntropyMaps] = None
    quant: Optional[EntropyMaps] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def per_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, max)``, each ``(L, H_max)``: divergence of each head over its entries (Fig. 4a); NaN where a
        layer has fewer heads than ``H_max`` (Swin stages)."""
        return per_head_stats(self.kl)

    def cls_rows(self, layer: int) -> Optional[torch.Tensor]:
        """``(H, gh, gw)`` divergence of the CLS row over the patch grid (Fig. 4b-c); ``None`` for Swin."""
        return cls_row_grid(self.kl[layer], int(self.meta.get("num_prefix_tokens", 1)), self.meta.get("grid"))

    def summary(self) -> list[dict[str, Any]]:
        """One row per (layer, head): ``layer``, ``head``, ``kl_mean``, ``kl_max`` (0-based, as every eamvit option)."""
        mean, mx = self.per_head()
        return [{"layer": l, "head": h, "kl_mean": round(float(mean[l, h]), 6), "kl_max": round(float(mx[l, h]), 6)}
                for l in range(mean.shape[0]) for h in range(mean.shape[1]) if not math.isnan(float(mean[l, h]))]

    def save(self, path: str | os.PathLike) -> None:
        save_tensors(path, {f"kl.{l}": k for l, k in enumerate(self.kl)}, {"format": "eamvit-kl-maps/1", **self.meta})


def per_head_stats(kl: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, max)`` ``(L, H_max)`` over each head's entries; heads are dim -3 of every layer map."""
    heads = [k.shape[-3] for k in kl]
    mean, mx = torch.full((2, len(kl), max(heads)), float("nan"))
    for l, k in enumerate(kl):
        rows = k.movedim(-3, 0).reshape(heads[l], -1).double()
        mean[l, : heads[l]] = rows.mean(1).float()
        mx[l, : heads[l]] = rows.amax(1).float()
    return mean, mx


def cls_row_grid(layer_map: torch.Tensor, num_prefix: int = 1,
                 grid: Optional[Sequence[int]] = None) -> Optional[torch.Tensor]:
    """The CLS row of a ViT layer map ``(H, N, N)`` over the patch tokens after ``num_prefix`` prefix tokens,
    laid on the patch ``grid`` (square by default): ``(H, gh, gw)``; ``None`` for a 4-D Swin map (no CLS)."""
    if layer_map.dim() != 3:
        return None
    row = layer_map[:, 0, num_prefix:]
    n = row.shape[-1]
    if grid and grid[0] * grid[1] == n:
        gh, gw = int(grid[0]), int(grid[1])
    else:
        gh = gw = int(math.isqrt(n))
        if gh * gw != n:
            raise EamError(f"cannot lay {n} patch tokens on a square grid; pass the patch grid")
    return row.reshape(row.shape[0], gh, gw)


def compute_kl_maps(fp_model: nn.Module, q_model: nn.Module, dataset: Dataset, *,
                    indices: Optional[Sequence[int]] = None, bits: int = 8, batch_size: int = 32,
                    progress: bool = True, options: CalibOptions = CalibOptions()) -> KLMaps:
    """Entropy maps of ``fp_model`` and its quantized copy ``q_model`` over the same images, and the KL map
    between them (the settings are :func:`~eamvit.methods.calibrate.compute_entropy_maps`'s; histograms are
    always kept; smoothing: :func:`kl_maps`'s default ``eps``)."""
    qcfg = step_config(q_model, "quant")
    maps = lambda model, quant: compute_entropy_maps(
        model, dataset, indices=indices, bits=bits, batch_size=batch_size, progress=progress,
        options=replace(options, keep_histograms=True, meta={**(options.meta or {}), "quant": quant}))
    fp, quant = maps(fp_model, None), maps(q_model, qcfg.to_dict() if qcfg is not None else None)
    kl = kl_maps(fp.histograms, quant.histograms)
    meta = {"eps": KL_EPS, "bits": bits, "num_images": fp.meta.get("num_images"),
            "num_prefix_tokens": fp.meta.get("num_prefix_tokens", 1), "grid": fp.meta.get("grid"),
            "model": fp.meta.get("model"), "quant": quant.meta.get("quant")}
    return KLMaps(kl=kl, fp=fp, quant=quant, meta=meta)
