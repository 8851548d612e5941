"""Fine-tuning with frozen attention (the EAM paper's future work), on the one training loop.

The model is frozen first (:func:`eamvit.methods.freeze.freeze_`: entry, row or head granularity,
fp32 or quantized frozen values) and then trained with :func:`eamvit.methods.train.train`. Frozen
entries stay at their values throughout: ``torch.where`` passes no gradient to them, and executed
rows/heads never compute them, so gradients flow only through the attention that is still computed
(and through every other weight). The frozen values are not trained (the paper fixes them to the
calibration mean ``A^μ``; training them would be a different method).

Written to ``out_dir``: the per-epoch checkpoint (resumable; the frozen configuration is part of its
identity), ``finetuned.safetensors`` (a plain timm state dict), ``frozen.safetensors`` (the masks and
values, :func:`eamvit.methods.freeze.load_frozen` puts them back) and ``finetune.json``.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from eamvit.io import ensure_writable_dir, save_tensors, write_json
from eamvit.methods.calibrate import EntropyMaps
from eamvit.methods.freeze import FreezeConfig, freeze_, save_frozen
from eamvit.methods.models import model_spec
from eamvit.methods.train import TrainConfig, train

CHECKPOINT = "finetune_ckpt.pth"
WEIGHTS = "finetuned.safetensors"
FROZEN = "frozen.safetensors"


def finetune_frozen(model: nn.Module, train_ds: Dataset, maps: EntropyMaps, freeze: FreezeConfig,
                    config: TrainConfig = TrainConfig(), *, val_ds: Optional[Dataset] = None,
                    out_dir: Optional[str | os.PathLike] = None, resume: bool = True, stop_after: Optional[int] = None,
                    device: torch.device | str | None = None, workers: int = 0, progress: bool = True,
                    data_config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Freeze ``model``'s attention with ``freeze`` and fine-tune it in place with the rest trainable.

    Args:
        model: an instrumented model (``create_model`` instruments it).
        train_ds: training items ``(image, target)`` (with augmentation).
        maps: its entropy maps (and mean maps ``A^μ``).
        freeze: what to freeze (τ, granularity, selection, frozen-value precision).
        config: training hyper-parameters (:class:`~eamvit.methods.train.TrainConfig`).
        val_ds: evaluated after every epoch when given.
        out_dir: folder of the checkpoint and results; nothing is written when ``None``.
        resume: continue from ``out_dir``'s checkpoint (same options required).
        stop_after: run at most this many epochs in this call.
        device: where to train.
        workers: DataLoader workers.
        progress: progress bar.
        data_config: the model's preprocessing, saved with the weights.

    Returns:
        :func:`~eamvit.methods.train.train`'s result plus ``"freeze"``: the :class:`FreezeReport` dict.
    """
    freeze.validate()
    out = ensure_writable_dir(out_dir) if out_dir is not None else None
    report = freeze_(model, maps, freeze)
    ident = {"freeze": asdict(freeze), "model": model_spec(model).to_dict()}
    res = train(model, train_ds, config, val_ds=val_ds, checkpoint=out / CHECKPOINT if out is not None else None,
                resume=resume, stop_after=stop_after, identity=ident, device=device, workers=workers,
                progress=progress, desc="finetune (frozen attention)")
    res["freeze"] = report.to_dict()
    if out is not None and res["epochs_done"] == config.epochs:
        meta = {"format": "eamvit-finetuned/1", "model": model_spec(model).name, "train": config.to_dict(), **ident}
        if data_config is not None:
            meta["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
        save_tensors(out / WEIGHTS, model.state_dict(), meta)
        save_frozen(model, out / FROZEN, freeze)
        write_json(out / "finetune.json", {**res, "identity": meta})
    return res
