"""The one training loop of eamvit (the demo model, fine-tuning), deterministic and resumable, on timm's
factories (docs/architecture-quant-export.md)."""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np
import torch
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm.auto import tqdm

from eamvit.choices import AUGMENTS, IMAGENET_MIN_SIZE
from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.io import atomic_path
from eamvit.methods.data import build_dataset, eval_transform, make_loader
from eamvit.methods.evaluate import evaluate

FORMAT = "eamvit-train/1"
Schedule = Callable[[int, int], dict[str, Any]]


@dataclass(frozen=True)
class TrainConfig(Config):
    """Training hyper-parameters (saved with checkpoints; runtime settings are arguments of :func:`train`).

    Args:
        lr, min_lr: peak learning rate, and the final one of the cosine schedule.
        warmup_epochs: linear warm-up (per iteration) from ``warmup_lr`` to ``lr``.
        weight_decay: weight decay (not on biases, norms, tokens, position embeddings).
        label_smoothing: label smoothing of the cross-entropy (and of mixup targets).
        mixup, cutmix: timm mixup and cutmix α (0 = off).
        grad_clip: clip the gradient norm to this value (``None`` = off).
        opt, sched: timm optimizer and scheduler names (``create_optimizer_v2``, ``create_scheduler_v2``).
        seed: seed of shuffling, augmentation, mixup and dropout.
    """

    KIND: ClassVar[str] = "train"
    VERSION: ClassVar[int] = 1
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("warmup_epochs", "weight_decay", "label_smoothing", "mixup", "cutmix")

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
    grad_clip: Optional[float] = None
    opt: str = "adamw"
    sched: str = "cosine"
    seed: int = 0

    def _check(self) -> None:
        if self.epochs < 1:
            raise EamError(f"epochs must be a whole number ≥ 1, got {self.epochs}")
        for name in ("lr", "min_lr", "warmup_lr"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
                raise EamError(f"{name}={v} must be a positive finite learning rate")
        for name in self.NON_NEGATIVE:
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise EamError(f"{name}={v} must be ≥ 0")
        if self.label_smoothing >= 1:
            raise EamError(f"label_smoothing={self.label_smoothing} must be below 1")
        if self.batch_size < 1:
            raise EamError(f"batch size must be at least 1, got {self.batch_size}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise EamError(f"grad_clip={self.grad_clip} must be positive (or None for no clipping)")


class SeededItems(Dataset):
    """``dataset`` whose item ``i`` is drawn under a random state seeded from ``(seed, epoch, i)`` (Python's,
    torch's CPU and numpy's, restored after it), so each item's augmentation is the same in any worker and the
    caller's random streams are untouched. Set ``epoch`` before building each epoch's loader."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        s = hash((self.seed, self.epoch, int(i))) & 0x7FFF_FFFF_FFFF_FFFF
        py, npy = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % 2 ** 32)
                return self.dataset[i]
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _resume(run: "_Run", path: Path, ident: dict, generators: Sequence[torch.Generator]) -> tuple[int, list]:
    """Load a checkpoint into the run; returns the epochs done and their history."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EamError(f"cannot read training checkpoint {path} ({type(e).__name__}); delete it or pass "
                       "--no-resume") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise EamError(f"{path} is not an eamvit training checkpoint; delete it or choose another --out")
    if ck.get("identity") != ident:
        theirs = ck.get("identity") or {}
        what = next((k for k in ident if theirs.get(k) != ident[k]), "setup")
        raise EamError(f"training checkpoint {path} was made with a different {what} configuration; "
                       "use the same options to resume, or pass --no-resume to start over")
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    run.step = ck["step"]
    s = ck["rng"]
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_cached"]))
    for g, state in zip(generators, s["generators"]):
        g.set_state(state)
    return ck["epoch"], list(ck["history"])


def _save(path: Path, model: nn.Module, opt, done: dict, ident: dict, generators) -> None:
    _, keys, pos, has_gauss, cached = np.random.get_state()  # as tensors and numbers: weights_only loads them
    rng = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
           "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
           "generators": [g.get_state() for g in generators]}
    state = {"format": FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": opt.state_dict(), **done, "identity": ident, "rng": rng}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _loss_fn(config: TrainConfig, num_classes: int):
    """Loss, and timm's Mixup when mixup or cutmix is on (soft targets)."""
    if config.mixup > 0 or config.cutmix > 0:
        mix = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                    num_classes=num_classes)
        return SoftTargetCrossEntropy(), mix
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), None


def _factories(model: nn.Module, config: TrainConfig, steps_per_epoch: int):
    try:
        opt = create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay)
    except (AssertionError, ValueError, KeyError):
        raise EamError(f"timm has no optimizer {config.opt!r}; use e.g. adamw, sgd or lamb") from None
    try:
        # The decay runs over the epochs after the warm-up (warmup_prefix), as DeiT's and EViT's schedules
        # do; a run shorter than its warm-up never reaches the decay, whose length then does not matter.
        decay = config.epochs - config.warmup_epochs if config.epochs > config.warmup_epochs else 1
        sched, _ = create_scheduler_v2(opt, sched=config.sched, num_epochs=decay, min_lr=config.min_lr,
                                       warmup_lr=config.warmup_lr, warmup_epochs=config.warmup_epochs,
                                       warmup_prefix=True, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    except (AssertionError, ValueError):
        sched = None
    if sched is None or config.sched == "plateau":  # 'plateau' needs a metric per epoch, not per step
        raise EamError(f"timm scheduler {config.sched!r} is unknown or cannot be stepped per iteration; use e.g. "
                       "cosine, step, poly or constant")
    return opt, sched


@dataclass
class _Run:
    """What one call of :func:`train` works with."""

    model: nn.Module
    config: TrainConfig
    opt: Any
    sched: Any
    loss_fn: Any
    mixup: Any
    device: torch.device
    schedule: Optional[Schedule]
    steps_per_epoch: int
    step: int = 0

    def extra(self) -> dict[str, Any]:
        return self.schedule(self.step, self.steps_per_epoch) if self.schedule is not None else {}


def _epoch_row(run: _Run, epoch: int, loss: float, skipped: int, val_ds: Optional[Dataset]) -> dict[str, Any]:
    """An epoch's history row: loss, learning rate, schedule values, unreadable images skipped, ``val_ds`` top-1/5."""
    run.sched.step_update(run.step)
    row = {"epoch": epoch + 1, "loss": round(loss, 5), "lr": run.opt.param_groups[0]["lr"], **run.extra(),
           "skipped_images": skipped}
    if val_ds is not None:
        met = evaluate(run.model, val_ds, batch_size=max(64, run.config.batch_size), device=run.device,
                       progress=False)
        row.update({k: met[k] for k in ("top1", "top5")})
    return row


def _epoch(run: _Run, data: SeededItems, workers: int, bar) -> tuple[float, int]:
    """One pass over ``data``; returns the mean loss and the number of unreadable images skipped."""
    cfg = run.config
    loader = make_loader(data, batch_size=cfg.batch_size, workers=workers, shuffle=True, seed=cfg.seed + data.epoch)
    run.model.train()
    total, count, skipped = 0.0, 0, 0
    for batch in loader:
        skipped += batch.skipped
        if not batch.images.numel():
            continue
        run.sched.step_update(run.step)
        extra = run.extra()
        x, y = batch.images.to(run.device), batch.targets.to(run.device)
        if run.mixup is not None:
            if x.shape[0] % 2:  # timm's Mixup needs an even batch
                x, y = x[:-1], y[:-1]
            if not x.shape[0]:
                continue
            x, y = run.mixup(x, y)
        loss = run.loss_fn(run.model(x), y)
        if not torch.isfinite(loss):
            raise EamError(f"the loss became {loss.item()} at step {run.step}; lower --lr")
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        run.opt.step()
        run.step += 1
        total += loss.item() * x.shape[0]
        count += x.shape[0]
        bar.set_postfix(epoch=data.epoch + 1, loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in extra.items()})
        bar.update(1)
    return total / max(1, count), skipped


def train(model: nn.Module, train_ds: Dataset, config: TrainConfig, *, val_ds: Optional[Dataset] = None,
          checkpoint: Optional[str | os.PathLike] = None, resume: bool = True, stop_after: Optional[int] = None,
          schedule: Optional[Schedule] = None, identity: Optional[dict[str, Any]] = None,
          generators: Sequence[torch.Generator] = (), device: torch.device | str | None = None, workers: int = 0,
          progress: bool = True, desc: str = "train") -> dict[str, Any]:
    """Train a timm classifier ``model`` in place.

    Args:
        train_ds: training items ``(image, target)`` (with augmentation).
        val_ds: evaluated (top-1/top-5) after every epoch when given.
        checkpoint: file of the per-epoch checkpoint (``None``: none is written).
        resume: continue from ``checkpoint`` when it exists (same config and identity required).
        stop_after: run at most this many epochs in this call (a time-limited job resumes later).
        schedule: ``f(step, steps_per_epoch) -> {name: value}`` called before every step and before
            each epoch's evaluation (fine-tuning sets the keep rate there); the values go to the history.
        identity: what else a checkpoint must match to be resumed (e.g. the pruning and the model).
        generators: further random generators whose states are checkpointed.
        device: where to train (the model's device by default).
        workers: DataLoader workers (the result does not depend on them).

    Returns:
        ``history`` (per-epoch rows), ``epochs_done``, ``final`` (the last row), ``images`` (training images read),
        ``skipped_images`` (unreadable ones), ``checkpoint`` (path or None).
    """
    if len(train_ds) == 0:
        raise EamError("the training set is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    ident = {"train": config.to_dict(), **(identity or {})}
    steps_per_epoch = math.ceil(len(train_ds) / config.batch_size)
    opt, sched = _factories(model, config, steps_per_epoch)
    num_classes = int(getattr(model, "num_classes", 0) or model.get_classifier().out_features)
    run = _Run(model, config, opt, sched, *_loss_fn(config, num_classes), device, schedule, steps_per_epoch)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2 ** 32)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    start, history = _resume(run, ckpt, ident, generators) if ckpt is not None and resume and ckpt.is_file() else (0, [])
    data = SeededItems(train_ds, config.seed)
    end = config.epochs if stop_after is None else min(config.epochs, start + max(0, stop_after))
    bar = tqdm(total=(end - start) * steps_per_epoch, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for epoch in range(start, end):
            data.epoch = epoch
            loss, skipped = _epoch(run, data, workers, bar)
            history.append(_epoch_row(run, epoch, loss, skipped, val_ds))
            if ckpt is not None:
                _save(ckpt, model, opt, {"epoch": epoch + 1, "step": run.step, "history": history}, ident, generators)
    finally:
        bar.close()
        model.eval()
        run.extra()  # leave the model in the state training has reached (e.g. its keep rate)
    skipped = history[-1].get("skipped_images", 0) if history else 0  # in the last epoch trained
    return {"history": history, "epochs_done": len(history), "final": history[-1] if history else None,
            "images": len(train_ds) - skipped, "skipped_images": skipped,
            "checkpoint": str(ckpt) if ckpt is not None else None}


def resolve_augment(augment: str, input_size: Sequence[int]) -> str:
    """The augmentation ``"auto"`` stands for: ``"imagenet"`` for inputs of at least
    ``IMAGENET_MIN_SIZE`` pixels a side, ``"shift"`` below (a 16×16 digit survives no random crop)."""
    if augment not in AUGMENTS:
        raise EamError(f"augmentation {augment!r} is not one of {', '.join(AUGMENTS)}")
    if augment != "auto":
        return augment
    return "imagenet" if min(int(s) for s in input_size[1:]) >= IMAGENET_MIN_SIZE else "shift"


class RandomShift:
    """Cyclic shift of a ``(C, H, W)`` tensor by up to ±1/8 of each side (the digits' one-pixel shifts)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sy, sx = max(1, x.shape[-2] // 8), max(1, x.shape[-1] // 8)
        dy = int(torch.randint(-sy, sy + 1, ()))
        dx = int(torch.randint(-sx, sx + 1, ()))
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def train_dataset(spec: str, data_cfg: dict[str, Any], augment: str = "auto", strict_images: bool = False) -> Dataset:
    """The training split with augmentation, preprocessed with ``data_cfg`` (overrides applied).

    Args:
        spec: ``"digits"`` (its training split) or an ImageFolder path.
        data_cfg: timm data config; ``crop_pct``/``crop_mode`` apply to ``none`` and ``shift`` (``imagenet``
            crops at random).
        augment: ``"none"`` (the evaluation transform), ``"shift"`` (it, then random cyclic shifts of
            up to ±1/8 of the side), ``"imagenet"`` (timm's training transform: random-resized crop,
            flip, colour jitter) or ``"auto"`` (:func:`resolve_augment`).
        strict_images: fail on an unreadable image instead of skipping it.
    """
    mode = resolve_augment(augment, data_cfg["input_size"])
    if spec == "digits":
        if mode == "imagenet":
            raise EamError("--augment imagenet needs an image folder (the digits are tensors); use shift or none")
        # The digits' own preprocessing (mean/std 0.5, bilinear), at the config's side.
        return build_dataset("digits", split="train", img_size=int(data_cfg["input_size"][-1]), augment=mode == "shift")
    if mode == "imagenet":
        transform = create_transform(input_size=data_cfg["input_size"], is_training=True, mean=data_cfg["mean"],
                                     std=data_cfg["std"], interpolation=data_cfg.get("interpolation", "bilinear"))
    else:
        transform = eval_transform(data_cfg)
        if mode == "shift":
            transform = transforms.Compose([transform, RandomShift()])
    return build_dataset(spec, data_cfg, strict_images=strict_images, transform=transform)
