"""The demo model: a small timm ViT trained on scikit-learn's bundled digits (offline, minutes on CPU).
Design and the shipped checkpoint's history: ``docs/architecture-experiments.md``, "digits".
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
from torch import nn

from eamvit.io import check_output_file
from eamvit.methods.data import DigitsDataset, digits_data_config
from eamvit.methods.evaluate import evaluate
from eamvit.methods.models import BUNDLED_MODEL, create_model, save_checkpoint
from eamvit.methods.train import TrainConfig, train

DEMO_MODEL = "vit_tiny_patch16_224"
# 8x8 digits upsampled to 16x16, one patch per original pixel: an 8x8 grid of 64 patches + CLS.
DEMO_KWARGS = dict(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4)
ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits_vit.safetensors"


@dataclass(frozen=True)
class DigitsConfig(TrainConfig):
    """Training recipe of the demo model (:class:`~eamvit.methods.train.TrainConfig` fields, other defaults)."""

    KIND: ClassVar[str] = "digits-train"
    VERSION: ClassVar[int] = 1

    epochs: int = 80
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-5
    weight_decay: float = 0.05


def train_digits(out: str | os.PathLike, config: DigitsConfig = DigitsConfig(), progress: bool = True,
                 device: str | torch.device = "cpu") -> dict:
    """Train the demo ViT on the digits training split and save it to ``out`` (checked before training starts);
    returns top-1/top-5 on the held-out test split."""
    out = check_output_file(out)
    torch.manual_seed(config.seed)
    model = create_model(DEMO_MODEL, model_kwargs=DEMO_KWARGS, device=device)
    data = DigitsDataset("train", img_size=DEMO_KWARGS["img_size"], augment=True)
    train(model, data, config, device=device, progress=progress, desc="train digits ViT")
    result = evaluate(model, DigitsDataset("test", img_size=DEMO_KWARGS["img_size"]), batch_size=256, progress=False)
    save_checkpoint(model, out, digits_data_config(DEMO_KWARGS["img_size"]),
                    extra={"train": config.to_dict(), "test_top1": round(result["top1"], 2)})
    return result


def load_demo_model(checkpoint: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu") -> nn.Module:
    """The trained digits ViT (the shipped checkpoint unless another is given)."""
    return create_model(BUNDLED_MODEL, checkpoint=checkpoint, device=device)
