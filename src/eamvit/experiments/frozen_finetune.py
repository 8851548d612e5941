"""Top-1 before and after a short fine-tune with frozen attention, entropy against random freezing.
Design: ``docs/architecture-experiments.md``, "frozen_finetune".
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Any, Sequence

from torch import nn
from torch.utils.data import Dataset

from eamvit.experiments.results import Column, ResultRow, markdown
from eamvit.experiments.runner import EvalData, result_row
from eamvit.methods.calibrate import EntropyMaps
from eamvit.methods.finetune import FinetuneConfig, finetune
from eamvit.methods.freeze import FreezeConfig, freeze_

# For a model already trained: a little above EViT's fine-tuning lr (its 2e-5 is for 30 ImageNet epochs).
SHORT_RECIPE = FinetuneConfig(epochs=2, lr=1e-4, min_lr=1e-5, batch_size=64, label_smoothing=0.0)

COLUMNS = [Column("tau", "τ"), Column("selection"), Column("granularity"),
           Column("frozen_fraction", "frozen", ".3f"), Column("top1", "top-1 frozen", ".2f"),
           Column("top1_finetuned", "top-1 fine-tuned", ".2f"), Column("seconds", "s / row", ".1f")]


def frozen_finetune_table(model: nn.Module, train_ds: Dataset, data: EvalData, maps: EntropyMaps,
                          taus: Sequence[float] = (0.5, 0.7, 0.9), selections: Sequence[str] = ("entropy", "random"),
                          freeze: FreezeConfig = FreezeConfig(), config: FinetuneConfig = SHORT_RECIPE,
                          progress: bool = False) -> list[ResultRow]:
    """For every (τ, selection): top-1 of a frozen deep copy of ``model`` off the shelf (``top1``), then after
    fine-tuning it (``top1_finetuned``; ``seconds``: fine-tuning and both evaluations).

    Args:
        data: held-out items; its device is where everything runs.
        freeze: the config of every row; its ``tau`` and ``selection`` are replaced per row.
        config: the fine-tuning recipe, the same for every row.
    """
    rows = []
    for tau in taus:
        for sel in selections:
            fcfg = replace(freeze, tau=tau, selection=sel)
            start = time.perf_counter()
            m = copy.deepcopy(model)
            report = freeze_(m, maps, fcfg)
            before = data.evaluate(m)
            finetune(m, train_ds, config, device=data.device, progress=progress, freeze=fcfg)
            after = data.evaluate(m)["top1"]
            fields = {"tau": tau, "selection": sel, "granularity": freeze.granularity,
                      "frozen_fraction": round(report.frozen_fraction, 6), "top1_finetuned": after,
                      "epochs": config.epochs, "lr": config.lr, "seconds": round(time.perf_counter() - start, 2)}
            rows.append(result_row(m, [before], fields, data.data_config))
    return rows


def markdown_table(rows: Sequence[ResultRow | dict[str, Any]]) -> str:
    """The table of :func:`frozen_finetune_table` as markdown (the columns of :data:`COLUMNS`)."""
    return markdown(rows, COLUMNS)
