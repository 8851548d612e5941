"""Token-pruning sweeps and the demo's pruning table: top-1, GMACs and images/s per (method, κ), on the
sweep runner (:func:`eamvit.experiments.runner.run_sweep`).

Rows name the pruning method ``prune`` (blank on the unpruned row, with its ``keep_rate``), its
Rényi order ``alpha`` and ``keep_rate``; ``gmacs`` counts multiply-accumulates per image.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from eamvit.experiments.results import Column, ResultRow, markdown
from eamvit.experiments.runner import Applied, EvalData, Point, Timing, run_sweep
from eamvit.methods.models import patch_grid
from eamvit.methods.cost import count_gflops
from eamvit.methods.prune import PruneConfig, check_keep_rate, method_config, prune_, row_label, unprune_

KEEP_RATES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
SWEEP_METHODS: tuple[tuple[str, Optional[float]], ...] = (
    ("shannon", None), ("renyi", 0.5), ("renyi", 2.0), ("renyi", 3.0), ("renyi", math.inf), ("evit", None),
    ("random", None))


def _jobs(keep_rates: Sequence[float], methods: Sequence[tuple[str, Optional[float]]],
          options: dict[str, Any]) -> list[PruneConfig]:
    """The configuration of every (κ, method) point, every one checked before any work is done."""
    for k in keep_rates:
        check_keep_rate(k)
    return [method_config(m, a, k, **options) for k in keep_rates for m, a in methods]


@contextmanager
def _unpruned(model: nn.Module, seed: int) -> Iterator[Applied]:
    grid = patch_grid(model)
    yield Applied({"gmacs": round(count_gflops(model), 4), "tokens": str(grid[0] * grid[1] if grid else 0),
                   "blocks": "", "placement": "", "fuse": False})


def pruned_state(config: PruneConfig, measure: Optional[Callable[[nn.Module], dict[str, Any]]] = None):
    """A sweep point's state: ``model`` pruned with ``config``; the row gets GMACs, tokens per stage,
    blocks, placement, fusion and what ``measure(pruned model)`` returns; unpruned on exit."""
    @contextmanager
    def state(model: nn.Module, seed: int) -> Iterator[Applied]:
        prune_(model, config)
        fields = {"gmacs": round(count_gflops(model), 4), **(measure(model) if measure is not None else {})}
        # Counting and measuring ran forwards, which drew from random pruning's stream: prune afresh
        # so that the evaluation starts from the seed, as `eval --prune random` does.
        report = prune_(model, config)
        try:
            yield Applied({**fields, "tokens": "-".join(map(str, report.tokens_per_stage)),
                           "blocks": "-".join(map(str, report.blocks)), "placement": config.placement,
                           "fuse": config.fuse_tokens})
        finally:
            unprune_(model)
    return state


def prune_sweep(model: nn.Module, dataset, keep_rates: Sequence[float] = KEEP_RATES,
                methods: Sequence[tuple[str, Optional[float]]] = SWEEP_METHODS, indices: Optional[Sequence[int]] = None,
                batch_size: int = 64, workers: int = 0, device: torch.device | str | None = None,
                throughput: bool = True, throughput_batch: int = 32, throughput_iters: int = 10,
                progress: bool = True, label: str = "", data_config: Optional[dict] = None,
                **options: Any) -> list[ResultRow]:
    """Top-1, GMACs and images/s for every (method, κ), off the shelf (no fine-tuning).

    The first row is the unpruned model (``prune`` and ``keep_rate`` blank). The model is left unpruned.

    Args:
        model: a timm ViT/DeiT.
        dataset: evaluation dataset (items ``(image, target)``).
        keep_rates: κ values.
        methods: ``(method, alpha)`` pairs (alpha ``None`` except for ``"renyi"``).
        indices: evaluation subset.
        batch_size: evaluation batch size.
        workers: DataLoader workers.
        device: where to run.
        throughput: also time images/s (the runner's ``measure_throughput``: ``throughput_iters``
            forwards of ``throughput_batch`` images after one untimed one).
        progress: progress bar.
        label: copied into every row.
        data_config: the timm data config ``dataset`` was built with (recorded in the rows).
        **options: further :class:`PruneConfig` fields (``blocks``, ``placement``, ``keys``, ``fuse``).

    Returns:
        :class:`~eamvit.experiments.results.ResultRow` s with ``label, prune, alpha, keep_rate``, top-1/top-5,
        ``gmacs, tokens, blocks, placement, fuse`` and ``images_per_s`` with its quartiles.
    """
    points = [Point({"label": label, "prune": None, "alpha": None, "keep_rate": None}, _unpruned)]
    for cfg in _jobs(keep_rates, methods, options):
        alpha = cfg.order if cfg.method == "renyi" else None
        points.append(Point({"label": label, "prune": cfg.method, "alpha": "inf" if alpha == math.inf else alpha,
                             "keep_rate": cfg.keep_rate}, pruned_state(cfg)))  # JSON has no inf
    timing = Timing(batch_size=throughput_batch, warmup=1, reps=throughput_iters) if throughput else None
    unprune_(model)
    data = EvalData(dataset, indices, batch_size=batch_size, workers=workers, device=device, data_config=data_config)
    return run_sweep(model, data, points, timing=timing, progress=progress, desc=f"prune sweep {label}".strip())


def _fmt_gmacs(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.2f}"


def markdown_table(rows: Sequence[ResultRow | dict[str, Any]]) -> str:
    """Markdown table of sweep rows (Δ top-1 against the unpruned row when there is one)."""
    base = next((r for r in rows if not r["prune"]), None)
    view = [{"method": row_label(r), "keep_rate": r["keep_rate"], "tokens": str(r["tokens"]).replace("-", "→"),
             "top1": r["top1"], "delta": r["top1"] - base["top1"] if base is not None and r is not base else None,
             "gmacs": r["gmacs"], "images_per_s": r.get("images_per_s"), "top1_finetuned": r.get("top1_finetuned")}
            for r in rows]
    columns = [Column("method"), Column("keep_rate", "κ", "g"), Column("tokens", "tokens per stage"),
               Column("top1", "top-1 (%)", ".2f"), Column("delta", "Δ top-1", "+.2f"),
               Column("gmacs", "GMACs", _fmt_gmacs), Column("images_per_s", "images/s", ".0f")]
    if any(v["top1_finetuned"] is not None for v in view):
        columns.append(Column("top1_finetuned", "top-1 fine-tuned (%)", ".2f"))
    return markdown(view, columns)


def prune_table(model: nn.Module, train_ds, test_ds, keep_rates: Sequence[float] = (0.7, 0.5),
                methods: Sequence[tuple[str, Optional[float]]] = (("shannon", None), ("renyi", 2.0), ("evit", None),
                                                                   ("random", None)),
                finetune_epochs: int = 0, finetune_lr: float = 1e-4, batch_size: int = 256,
                device: torch.device | str | None = None, progress: bool = True,
                throughput_batch: int = 64, data_config: Optional[dict] = None) -> tuple[list[ResultRow], str]:
    """The demo's pruning table: off-the-shelf top-1, GMACs and images/s per (method, κ).

    Args:
        model: the trained model (left unchanged and unpruned).
        train_ds: training split, used only when ``finetune_epochs > 0``.
        test_ds: held-out split for top-1.
        keep_rates: κ values.
        methods: ``(method, alpha)`` pairs.
        finetune_epochs: if > 0, each row is also fine-tuned (a copy of the model, the EViT recipe
            with this many epochs and ``finetune_lr``) and ``top1_finetuned`` is added.
        finetune_lr: peak learning rate of those fine-tunes.
        batch_size: evaluation batch size.
        device: where to run.
        progress: progress bars.
        throughput_batch: images per timed forward.
        data_config: the data config ``test_ds`` was built with (recorded in the rows).

    Returns:
        ``(rows, markdown)``.
    """
    rows = prune_sweep(model, test_ds, keep_rates, methods, batch_size=batch_size, device=device,
                       throughput_batch=throughput_batch, progress=progress, label="off the shelf",
                       data_config=data_config)
    if finetune_epochs > 0:
        import copy

        from eamvit.methods.evaluate import evaluate
        from eamvit.methods.finetune import FinetuneConfig, finetune

        ftc = FinetuneConfig(epochs=finetune_epochs, lr=finetune_lr, min_lr=finetune_lr / 10, batch_size=64)
        for r in rows:
            if not r["prune"]:
                continue
            alpha = math.inf if r["alpha"] == "inf" else r["alpha"]
            m = copy.deepcopy(model)
            prune_(m, method_config(r["prune"], alpha, r["keep_rate"]))
            finetune(m, train_ds, ftc, progress=progress, device=device)
            r.fields["top1_finetuned"] = evaluate(m, test_ds, batch_size=batch_size, device=device,
                                                  progress=False)["top1"]
    return rows, markdown_table(rows)


ENTROPY_ORDERS = (1.0, 2.0, 3.0, math.inf)  # the Rényi orders of the seed's Fig. 5


def figure_data(model: nn.Module, images: torch.Tensor,
                configs: Sequence[PruneConfig]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the seed's Fig. 4 and Fig. 5 show: the patches each config keeps at every stage of the
    first image (:func:`~eamvit.methods.prune.kept_patch_masks`), and the patch tokens' attention
    entropy per block for :data:`ENTROPY_ORDERS` over all ``images``
    (:func:`~eamvit.methods.prune.token_entropies`).

    Args:
        model: the unpruned model.
        images: a ``(B, C, H, W)`` batch on the model's device.
        configs: one pruning config per method shown.
    """
    from eamvit.methods.prune import kept_patch_masks, token_entropies

    return kept_patch_masks(model, images[0], configs), token_entropies(model, images, ENTROPY_ORDERS)
