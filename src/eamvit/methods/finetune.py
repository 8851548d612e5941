"""Fine-tuning a pruned ViT/DeiT (EViT's recipe by default), resumable from atomic checkpoints.

Defaults follow EViT's published fine-tuning script (``finetune.sh``): AdamW, cosine schedule from
``lr = 2e-5`` to ``min_lr = 2e-6``, weight decay ``1e-6``, no warm-up, 30 epochs, the target keep
rate from the start (``keep_warmup_epochs = keep_decay_epochs = 0``). EViT's training from scratch
uses the keep-rate schedule ``κ = 1`` for ``keep_warmup_epochs = 10`` epochs, then a per-iteration
cosine from 1 to the target over ``keep_decay_epochs = 100`` epochs; both are options.
Deviations from EViT/DeiT, as options with these defaults: learning rates are absolute (DeiT scales
them by ``batch/512``); mixup/cutmix are off (DeiT uses 0.8/1.0; on small data and short runs they
cost accuracy); label smoothing 0.1 as DeiT.

A checkpoint (``finetune_ckpt.pth``) is written atomically after every epoch with the model,
optimizer and random-number states, so an interrupted run resumes to the same weights it would have
reached uninterrupted. Its ``"model"`` entry is a plain timm state dict: ``create_model(...,
checkpoint=...)`` loads it directly.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from eamvit.methods.data import make_loader
from eamvit.errors import EamError
from eamvit.io import atomic_path, ensure_writable_dir, write_json
from eamvit.methods.models import model_spec
from eamvit.methods.prune import check_keep_rate, prune_state, set_keep_rate

CHECKPOINT = "finetune_ckpt.pth"
FORMAT = "eamvit-finetune/1"


@dataclass
class FinetuneConfig:
    """Fine-tuning recipe.

    Args:
        epochs: passes over the training set.
        lr: peak AdamW learning rate.
        min_lr: final learning rate of the cosine schedule.
        warmup_epochs: linear warm-up (per iteration) from ``warmup_lr`` to ``lr``.
        warmup_lr: learning rate at the first step of the warm-up.
        weight_decay: AdamW weight decay.
        batch_size: images per step.
        label_smoothing: label smoothing of the cross-entropy (and of mixup targets).
        mixup: timm mixup α (0 = off).
        cutmix: timm cutmix α (0 = off).
        keep_warmup_epochs: epochs at κ = 1 before pruning starts (EViT's ``shrink_start_epoch``).
        keep_decay_epochs: epochs of the cosine from κ = 1 to the target (EViT's ``shrink_epochs``);
            0 = the target at once.
        grad_clip: clip the gradient norm to this value (``None`` = off, as EViT).
        seed: seed of shuffling, augmentation and mixup.
        workers: DataLoader workers.
    """

    epochs: int = 30
    lr: float = 2e-5
    min_lr: float = 2e-6
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    weight_decay: float = 1e-6
    batch_size: int = 64
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    keep_warmup_epochs: float = 0.0
    keep_decay_epochs: float = 0.0
    grad_clip: Optional[float] = None
    seed: int = 0
    workers: int = 0

    def validate(self) -> "FinetuneConfig":
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise EamError(f"epochs must be a whole number ≥ 1, got {self.epochs}")
        for name in ("lr", "min_lr", "warmup_lr"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
                raise EamError(f"{name}={v} must be a positive finite learning rate")
        for name in ("warmup_epochs", "weight_decay", "label_smoothing", "mixup", "cutmix", "keep_warmup_epochs",
                     "keep_decay_epochs"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise EamError(f"{name}={v} must be ≥ 0")
        if self.label_smoothing >= 1:
            raise EamError(f"label_smoothing={self.label_smoothing} must be below 1")
        if self.batch_size < 1:
            raise EamError(f"batch size must be at least 1, got {self.batch_size}")
        return self


def lr_at(step: float, steps_per_epoch: int, config: FinetuneConfig) -> float:
    """Learning rate at (fractional) ``step``: linear warm-up, then cosine from ``lr`` to ``min_lr``."""
    warm = config.warmup_epochs * steps_per_epoch
    total = config.epochs * steps_per_epoch
    if step < warm:
        return config.warmup_lr + (config.lr - config.warmup_lr) * step / warm
    t = (step - warm) / max(1.0, total - warm)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


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


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached)}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_cached"]))


def _identity(model: nn.Module, config: FinetuneConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: recipe, pruning and model."""
    return {"finetune": asdict(config), "prune": prune_state(model).config.to_dict(),
            "model": model_spec(model).to_dict()}


def _save(path: Path, model, opt, epoch: int, step: int, history: list, ident: dict, gen) -> None:
    state = {"format": FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "history": history,
             "identity": ident, "rng": _rng_state()}
    if gen is not None:
        state["prune_rng"] = gen.get_state()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load(path: Path, ident: dict) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EamError(f"cannot read fine-tuning checkpoint {path} ({type(e).__name__}); delete it or pass "
                       "--no-resume") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise EamError(f"{path} is not an eamvit fine-tuning checkpoint; delete it or choose another --out")
    if ck.get("identity") != ident:
        theirs = ck.get("identity") or {}
        what = next((k for k in ("model", "prune", "finetune") if theirs.get(k) != ident[k]), "setup")
        raise EamError(f"fine-tuning checkpoint {path} was made with a different {what} configuration; "
                       "use the same options to resume, or pass --no-resume to start over")
    return ck


def _loss_fn(config: FinetuneConfig, num_classes: int):
    """Loss, and timm's Mixup when mixup or cutmix is on (soft targets)."""
    if config.mixup > 0 or config.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mix = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                    num_classes=num_classes)
        return SoftTargetCrossEntropy(), mix
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), None


def finetune(model: nn.Module, train_ds: Dataset, config: FinetuneConfig = FinetuneConfig(),
             val_ds: Optional[Dataset] = None, out_dir: Optional[str | os.PathLike] = None, resume: bool = True,
             stop_after: Optional[int] = None, device: torch.device | str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Fine-tune a pruned model in place.

    Args:
        model: a model pruned with :func:`eamvit.prune.prune_` (its κ is the target keep rate).
        train_ds: training items ``(image, target)`` (with training augmentation).
        config: :class:`FinetuneConfig`.
        val_ds: evaluated (top-1/top-5) after every epoch when given.
        out_dir: folder of the checkpoint, the final weights (``finetuned.safetensors``) and
            ``finetune.json``; nothing is written when ``None``.
        resume: continue from ``out_dir``'s checkpoint when there is one (same options required).
        stop_after: run at most this many epochs in this call (a time-limited job resumes later).
        device: where to train (the model's device by default).
        progress: progress bar.

    Returns:
        ``{"history": [per-epoch rows], "epochs_done", "final": last row, "checkpoint": path or None}``.
    """
    config.validate()
    st = prune_state(model)
    target = check_keep_rate(st.config.keep_rate)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if len(train_ds) == 0:
        raise EamError("the training set is empty")
    out = ensure_writable_dir(out_dir) if out_dir is not None else None
    ckpt = out / CHECKPOINT if out is not None else None
    ident = _identity(model, config)
    num_classes = int(getattr(model, "num_classes", 0) or model.get_classifier().out_features)
    loss_fn, mixup = _loss_fn(config, num_classes)

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    # DeiT/timm convention: no weight decay on biases, norms, tokens and position embeddings.
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    start_epoch, step, history = 0, 0, []
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2 ** 32))
    if ckpt is not None and resume and ckpt.is_file():
        ck = _load(ckpt, ident)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, step, history = ck["epoch"], ck["step"], list(ck["history"])
        _set_rng_state(ck["rng"])
        if "prune_rng" in ck:
            st.generator = torch.Generator(device=device)
            st.generator.set_state(ck["prune_rng"])

    steps_per_epoch = math.ceil(len(train_ds) / config.batch_size)
    end_epoch = config.epochs if stop_after is None else min(config.epochs, start_epoch + max(0, stop_after))
    bar = tqdm(total=(end_epoch - start_epoch) * steps_per_epoch, desc="finetune", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, end_epoch):
            loader = make_loader(train_ds, batch_size=config.batch_size, workers=config.workers, shuffle=True,
                                 seed=config.seed + epoch)
            model.train()
            total, count = 0.0, 0
            for batch in loader:
                if not batch.images.numel():
                    continue
                lr = lr_at(step, steps_per_epoch, config)
                for g in opt.param_groups:
                    g["lr"] = lr
                kr = keep_rate_at(step, steps_per_epoch, target, config)
                st.keep_rate = kr
                x, y = batch.images.to(device), batch.targets.to(device)
                if mixup is not None:
                    if x.shape[0] % 2:  # timm's Mixup needs an even batch
                        x, y = x[:-1], y[:-1]
                    if not x.shape[0]:
                        continue
                    x, y = mixup(x, y)
                loss = loss_fn(model(x), y)
                if not torch.isfinite(loss):
                    raise EamError(f"the loss became {loss.item()} at step {step}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
                step += 1
                total += loss.item() * x.shape[0]
                count += x.shape[0]
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", keep=f"{kr:.3f}")
                bar.update(1)
            row: dict[str, Any] = {"epoch": epoch + 1, "loss": round(total / max(1, count), 5),
                                   "lr": lr_at(step, steps_per_epoch, config), "keep_rate": st.keep_rate}
            if val_ds is not None:
                from eamvit.methods.evaluate import evaluate

                set_keep_rate(model, keep_rate_at(step, steps_per_epoch, target, config))
                row.update({k: v for k, v in evaluate(model, val_ds, batch_size=max(64, config.batch_size),
                                                      device=device, progress=False).items()
                            if k in ("top1", "top5")})
            history.append(row)
            if ckpt is not None:
                _save(ckpt, model, opt, epoch + 1, step, history, ident, st.generator)
    finally:
        bar.close()
        model.eval()
        # Evaluation after (partial) training runs at the keep rate training has reached.
        st.keep_rate = keep_rate_at(step, steps_per_epoch, target, config)
    done = len(history)
    result = {"history": history, "epochs_done": done, "final": history[-1] if history else None,
              "checkpoint": str(ckpt) if ckpt is not None else None}
    if out is not None and done == config.epochs:
        from safetensors.torch import save_file

        with atomic_path(out / "finetuned.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                      metadata={"model": model_spec(model).name, "prune": str(ident["prune"])})
        write_json(out / "finetune.json", {**result, "identity": ident})
    return result


def train_dataset(spec: str, model: nn.Module, strict_images: bool = False) -> Dataset:
    """Training split with augmentation: ``"digits"`` (±1-pixel shifts) or an ImageFolder path (timm's
    training transform for the model's input size)."""
    from eamvit.methods.data import DigitsDataset, ImageFolderDataset
    from eamvit.methods.models import data_config

    cfg = data_config(model)
    if spec == "digits":
        return DigitsDataset("train", img_size=int(cfg["input_size"][-1]), augment=True)
    from timm.data import create_transform

    transform = create_transform(input_size=cfg["input_size"], is_training=True, mean=cfg["mean"], std=cfg["std"],
                                 interpolation=cfg.get("interpolation", "bilinear"))
    ds = ImageFolderDataset(spec, transform, grayscale=cfg["input_size"][0] == 1, strict=strict_images)
    if len(ds) == 0:
        raise EamError(f"image folder {spec} contains no images")
    return ds
