"""Fine-tuning a pruned ViT/DeiT (EViT's recipe by default) with the one training loop, resumable.

Defaults follow EViT's published fine-tuning script (``finetune.sh``): AdamW, cosine schedule from
``lr = 2e-5`` to ``min_lr = 2e-6``, weight decay ``1e-6``, no warm-up, 30 epochs, the target keep
rate from the start (``keep_warmup_epochs = keep_decay_epochs = 0``). EViT's training from scratch
uses the keep-rate schedule ``κ = 1`` for ``keep_warmup_epochs = 10`` epochs, then a per-iteration
cosine from 1 to the target over ``keep_decay_epochs = 100`` epochs; both are options.
Deviations from EViT/DeiT, as options with these defaults: learning rates are absolute (DeiT scales
them by ``batch/512``); mixup/cutmix are off (DeiT uses 0.8/1.0; on small data and short runs they
cost accuracy); label smoothing 0.1 as DeiT.

The checkpoint (``finetune_ckpt.pth``, see :func:`eamvit.methods.train.train`) also holds the
random-pruning generator. Its ``"model"`` entry is a plain timm state dict: ``create_model(...,
checkpoint=...)`` loads it directly.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from eamvit.errors import EamError
from eamvit.io import ensure_writable_dir, write_json
from eamvit.methods.models import model_spec, save_checkpoint
from eamvit.methods.prune import prune_state
from eamvit.methods.train import TrainConfig, train
from eamvit.ops.scores import check_keep_rate

CHECKPOINT = "finetune_ckpt.pth"
WEIGHTS = "finetuned.safetensors"


@dataclass
class FinetuneConfig(TrainConfig):
    """EViT's fine-tuning recipe: :class:`~eamvit.methods.train.TrainConfig` plus the keep-rate schedule.

    Args:
        keep_warmup_epochs: epochs at κ = 1 before pruning starts (EViT's ``shrink_start_epoch``).
        keep_decay_epochs: epochs of the cosine from κ = 1 to the target (EViT's ``shrink_epochs``);
            0 = the target at once.
    """

    KIND: ClassVar[str] = "finetune"
    VERSION: ClassVar[int] = 1

    keep_warmup_epochs: float = 0.0
    keep_decay_epochs: float = 0.0

    def validate(self) -> "FinetuneConfig":
        super().validate()
        for name in ("keep_warmup_epochs", "keep_decay_epochs"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise EamError(f"{name}={v} must be ≥ 0")
        return self


def keep_rate_at(step: int, steps_per_epoch: int, target: float, config: FinetuneConfig) -> float:
    """EViT's ``adjust_keep_rate``: 1 during ``keep_warmup_epochs``, then a per-iteration cosine to
    ``target`` over ``keep_decay_epochs``, then ``target``."""
    start = config.keep_warmup_epochs * steps_per_epoch
    if step < start:
        return 1.0
    span = config.keep_decay_epochs * steps_per_epoch
    if step >= start + span:
        return target
    return target + (1.0 - target) * 0.5 * (math.cos((step - start) / span * math.pi) + 1)


def finetune(model: nn.Module, train_ds: Dataset, config: FinetuneConfig = FinetuneConfig(),
             val_ds: Optional[Dataset] = None, out_dir: Optional[str | os.PathLike] = None, resume: bool = True,
             stop_after: Optional[int] = None, device: torch.device | str | None = None, workers: int = 0,
             progress: bool = True, data_config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Fine-tune a pruned model in place; the keep rate follows :func:`keep_rate_at`.

    Args:
        model: a model pruned with :func:`eamvit.methods.prune.prune_` (its κ is the target keep rate).
        train_ds: training items ``(image, target)`` (with augmentation).
        config: :class:`FinetuneConfig`.
        val_ds: evaluated (top-1/top-5) after every epoch when given.
        out_dir: folder of the checkpoint, the final weights (``finetuned.safetensors``) and
            ``finetune.json``; nothing is written when ``None``.
        resume: continue from ``out_dir``'s checkpoint when there is one (same options required).
        stop_after: run at most this many epochs in this call.
        device: where to train (the model's device by default).
        workers: DataLoader workers (the result does not depend on them).
        progress: progress bar.
        data_config: the model's preprocessing (timm data config), saved with the weights.

    Returns:
        :func:`eamvit.methods.train.train`'s result.
    """
    config.validate()
    st = prune_state(model)
    target = check_keep_rate(st.config.keep_rate)
    out = ensure_writable_dir(out_dir) if out_dir is not None else None
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if st.method == "random":  # a fresh, checkpointed stream: runs and resumes repeat exactly
        st.generator = torch.Generator(device=dev).manual_seed(st.seed)

    def schedule(step: int, steps_per_epoch: int) -> dict[str, Any]:
        st.keep_rate = keep_rate_at(step, steps_per_epoch, target, config)
        return {"keep_rate": st.keep_rate}

    ident = {"prune": st.config.to_dict(), "model": model_spec(model).to_dict()}
    res = train(model, train_ds, config, val_ds=val_ds, checkpoint=out / CHECKPOINT if out is not None else None,
                resume=resume, stop_after=stop_after, schedule=schedule, identity=ident,
                generators=[st.generator] if st.generator is not None else [], device=dev, workers=workers,
                progress=progress, desc="finetune")
    if out is not None and res["epochs_done"] == config.epochs:
        extra = {"train": config.to_dict(), "prune": ident["prune"]}
        save_checkpoint(model, out / WEIGHTS, data_config, extra=extra)
        write_json(out / "finetune.json", {**res, "identity": {**extra, "model": ident["model"]}})
    return res
