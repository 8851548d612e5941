"""Top-1 before and after fine-tuning with frozen attention, for entropy and random freezing."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from eamvit.methods.calibrate import EntropyMaps
from eamvit.methods.evaluate import evaluate
from eamvit.methods.finetune_frozen import finetune_frozen
from eamvit.methods.freeze import FreezeConfig, freeze_
from eamvit.methods.train import TrainConfig


def frozen_finetune_table(model: nn.Module, train_ds: Dataset, test_ds: Dataset, maps: EntropyMaps,
                          taus: Sequence[float] = (0.5, 0.7, 0.9), selections: Sequence[str] = ("entropy", "random"),
                          granularity: str = "entry", config: TrainConfig = TrainConfig(epochs=2, lr=1e-4, min_lr=1e-5),
                          batch_size: int = 256, device: torch.device | str | None = None,
                          progress: bool = False) -> list[dict[str, Any]]:
    """For every (τ, selection): top-1 frozen off the shelf, then after fine-tuning a copy the same way.

    Args:
        model: the trained model (left unchanged).
        train_ds: training split (fine-tuning).
        test_ds: held-out split (top-1).
        maps: its entropy maps.
        taus: sparsity levels.
        selections: ``"entropy"`` and/or ``"random"`` (seed 0).
        granularity: ``"entry"``, ``"row"`` or ``"head"``.
        config: the fine-tuning recipe (the same for every row).
        batch_size: evaluation batch size.
        device: where to run.
        progress: progress bars.

    Returns:
        Rows ``tau``, ``selection``, ``granularity``, ``top1_frozen``, ``top1_finetuned``, ``epochs``.
    """
    rows = []
    for tau in taus:
        for sel in selections:
            cfg = FreezeConfig(tau=tau, selection=sel, granularity=granularity)
            m = copy.deepcopy(model)
            freeze_(m, maps, cfg)
            before = evaluate(m, test_ds, batch_size=batch_size, device=device, progress=False)["top1"]
            finetune_frozen(m, train_ds, maps, cfg, config, device=device, progress=progress)
            after = evaluate(m, test_ds, batch_size=batch_size, device=device, progress=False)["top1"]
            rows.append({"tau": tau, "selection": sel, "granularity": granularity, "top1_frozen": before,
                         "top1_finetuned": after, "epochs": config.epochs})
    return rows
