"""The demo model: a small timm ViT trained on scikit-learn's bundled digits (offline, minutes on CPU).

The checkpoint in ``eamvit/assets`` was made by :func:`train_digits` (``eamvit train-digits``) with
the defaults below; ``eamvit demo --retrain`` makes a fresh one.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from eamvit.methods.data import DigitsDataset, make_loader
from eamvit.errors import EamError
from eamvit.methods.evaluate import evaluate
from eamvit.io import atomic_path
from eamvit.methods.models import create_model

DEMO_MODEL = "vit_tiny_patch16_224"
# 8x8 digits upsampled to 16x16, one patch per original pixel: an 8x8 grid of 64 patches + CLS.
DEMO_KWARGS = dict(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4)
ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits_vit.safetensors"


@dataclass
class TrainConfig:
    """Training recipe of the demo model.

    Args:
        epochs: passes over the 1437 training digits.
        lr: peak AdamW learning rate (linear warm-up for ``warmup_epochs``, then cosine).
        weight_decay: AdamW weight decay.
        batch_size: images per step.
        label_smoothing: cross-entropy label smoothing.
        seed: seed of initialisation, shuffling and augmentation.
    """

    epochs: int = 80
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup_epochs: int = 5
    label_smoothing: float = 0.1
    seed: int = 0


def train_digits(out: str | os.PathLike = ASSET, config: TrainConfig = TrainConfig(), progress: bool = True,
                 device: str | torch.device = "cpu") -> dict:
    """Train the demo ViT on the digits training split and save it (safetensors) to ``out``.

    Returns:
        ``{"top1": ..., "top5": ...}`` on the held-out test split.
    """
    from safetensors.torch import save_file

    if config.epochs < 1:
        raise EamError(f"epochs must be at least 1, got {config.epochs}")
    torch.manual_seed(config.seed)
    model = create_model(DEMO_MODEL, model_kwargs=DEMO_KWARGS, device=device)
    train = DigitsDataset("train", img_size=DEMO_KWARGS["img_size"], augment=True)
    test = DigitsDataset("test", img_size=DEMO_KWARGS["img_size"])
    loader = make_loader(train, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * len(loader)
    warm = config.warmup_epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    bar = tqdm(total=steps, desc="train digits ViT", unit="step", disable=not progress, dynamic_ncols=True)
    model.train()
    for _ in range(config.epochs):
        for batch in loader:
            loss = loss_fn(model(batch.images.to(device)), batch.targets.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    model.eval()
    result = evaluate(model, test, batch_size=256, progress=False)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"model": DEMO_MODEL, "test_top1": f"{result['top1']:.2f}"})
    return result


def load_demo_model(checkpoint: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu") -> nn.Module:
    """The trained digits ViT (the shipped checkpoint unless another is given)."""
    from eamvit.methods.models import BUNDLED_MODEL

    return create_model(BUNDLED_MODEL, checkpoint=checkpoint, device=device)
