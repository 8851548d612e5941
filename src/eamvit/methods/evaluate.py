"""Accuracy: top-1/top-5 of a classifier on a dataset (the one evaluation every sweep uses)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from eamvit.columns import HEAD
from eamvit.methods.calibrate import dist_info
from eamvit.methods.data import make_loader, shard
from eamvit.errors import EamError
from eamvit.methods.models import model_spec


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``'s logits (the first output of a model that returns several)."""
    out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, indices: Optional[Sequence[int]] = None, batch_size: int = 64,
             workers: int = 0, device: torch.device | str | None = None, progress: bool = True,
             desc: str = "eval") -> dict[str, Any]:
    """``top1``, ``top1_err``, ``top5``, ``top5_err`` (percent), ``num_images``, ``skipped_images`` of
    ``model`` (logits) on ``indices`` of ``dataset`` (all by default; ``None`` items are unreadable files,
    skipped and counted), on ``device`` (the model's by default).

    Under torch.distributed each process evaluates a disjoint shard and the counts are summed.
    """
    rank, world = dist_info()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    idx = list(range(len(dataset))) if indices is None else list(indices)
    loader = make_loader(dataset, shard(idx, rank, world), batch_size=batch_size, workers=workers)
    counts = torch.zeros(4, dtype=torch.int64)  # top1, top5, seen, skipped
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress or rank != 0,
                      leave=False, dynamic_ncols=True):
        counts[3] += batch.skipped
        if not batch.images.numel():
            continue
        logits = logits_of(model, batch.images.to(device, non_blocking=True))
        target = batch.targets.to(device)
        hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.eq(target.unsqueeze(1))
        counts[:3] += torch.tensor([int(hit[:, 0].sum()), int(hit.any(1).sum()), target.numel()])
    if world > 1:
        dist.all_reduce(counts)
    n = int(counts[2])
    if n == 0:
        raise EamError("no readable images to evaluate; check the dataset folder")
    top1, top5 = 100.0 * int(counts[0]) / n, 100.0 * int(counts[1]) / n
    return {"top1": round(top1, 3), "top1_err": round(100 - top1, 3), "top5": round(top5, 3),
            "top5_err": round(100 - top5, 3), "num_images": n, "skipped_images": int(counts[3])}


def result_row(model: nn.Module, metrics: dict[str, Any], data_cfg: Optional[dict] = None, **extra) -> dict:
    """The head of every results row (:data:`eamvit.columns.HEAD`: timm validate.py's fields and the data
    config ``data_cfg`` the images were built with), then ``extra`` (fields of :data:`eamvit.columns.COLUMNS`).

    Args:
        metrics: :func:`evaluate`'s result (or the mean of several).
    """
    spec = model_spec(model)
    cfg = data_cfg or {}
    floats = lambda v: None if v is None else ",".join(f"{float(x):g}" for x in v)
    return {"model": spec.name, **{k: metrics.get(k) for k in HEAD[1:6]},
            "skipped_images": metrics.get("skipped_images", 0),
            "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "img_size": (cfg.get("input_size") or [None, None])[-1],
            "crop_pct": cfg.get("crop_pct"), "interpolation": cfg.get("interpolation"),
            "crop_mode": cfg.get("crop_mode"), "mean": floats(cfg.get("mean")), "std": floats(cfg.get("std")),
            "data_config_source": cfg.get("source"), "weights": spec.weights, **extra}
