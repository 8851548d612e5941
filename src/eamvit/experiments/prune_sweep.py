"""Token-pruning sweeps and the demo's pruning table: top-1, GFLOPs and images/s per (method, κ).

Moved here unchanged from :mod:`eamvit.methods.prune`; the experiment runner will take them over.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from eamvit.methods.models import patch_grid
from eamvit.methods.cost import count_gflops, model_input_size
from eamvit.experiments.runner import Timing, measure_throughput
from eamvit.methods.prune import check_keep_rate, method_config, prune_, unprune_

KEEP_RATES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
SWEEP_METHODS: tuple[tuple[str, Optional[float]], ...] = (
    ("shannon", None), ("renyi", 0.5), ("renyi", 2.0), ("renyi", 3.0), ("renyi", math.inf), ("evit", None),
    ("random", None))


def _cost_row(model: nn.Module, input_size, throughput: bool, throughput_batch: int, throughput_iters: int,
              device) -> dict[str, Any]:
    row: dict[str, Any] = {"gflops": round(count_gflops(model, input_size, device=device), 4)}
    if throughput:  # repetitions, median and interquartile range: one pass is noise
        timing = Timing(batch_size=throughput_batch, warmup=1, reps=throughput_iters)
        with torch.inference_mode():
            row.update(measure_throughput(model, timing, input_size, device=device).fields())
    return row


def _jobs(keep_rates: Sequence[float], methods: Sequence[tuple[str, Optional[float]]],
          options: dict[str, Any]) -> list[tuple[str, Optional[float], float]]:
    """The (method, α, κ) points, every one checked before any work is done."""
    for k in keep_rates:
        check_keep_rate(k)
    jobs = [(m, a, k) for k in keep_rates for m, a in methods]
    for m, a, k in jobs:
        method_config(m, a, k, **options)
    return jobs


def prune_sweep(model: nn.Module, dataset, keep_rates: Sequence[float] = KEEP_RATES,
                methods: Sequence[tuple[str, Optional[float]]] = SWEEP_METHODS, indices: Optional[Sequence[int]] = None,
                batch_size: int = 64, workers: int = 0, device: torch.device | str | None = None,
                throughput: bool = True, throughput_batch: int = 32, throughput_iters: int = 10,
                progress: bool = True, label: str = "", **options: Any) -> list[dict[str, Any]]:
    """Top-1, GFLOPs and images/s for every (method, κ), off the shelf (no fine-tuning).

    The first row is the unpruned model (``method="none"``, κ = 1). The model is left unpruned.

    Args:
        model: a timm ViT/DeiT.
        dataset: evaluation dataset (items ``(image, target)``).
        keep_rates: κ values.
        methods: ``(method, alpha)`` pairs (alpha ``None`` except for ``"renyi"``).
        indices: evaluation subset.
        batch_size: evaluation batch size.
        workers: DataLoader workers.
        device: where to run.
        throughput: also time images/s (runner's ``measure_throughput``: ``throughput_iters`` forwards).
        progress: progress bar.
        label: copied into every row.
        **options: further :class:`PruneConfig` fields (``blocks``, ``placement``, ``keys``, ``fuse``).

    Returns:
        Rows: ``label, method, alpha, keep_rate, top1, top5, gflops, images_per_s*, tokens, blocks, ...``.
    """
    from tqdm.auto import tqdm

    from eamvit.methods.evaluate import evaluate

    jobs = _jobs(keep_rates, methods, options)
    input_size, grid = model_input_size(model, None), patch_grid(model)
    n0 = grid[0] * grid[1] if grid else 0

    def measured() -> dict[str, Any]:
        met = evaluate(model, dataset, indices, batch_size=batch_size, workers=workers, device=device, progress=False)
        return {"top1": met["top1"], "top5": met["top5"],
                **_cost_row(model, input_size, throughput, throughput_batch, throughput_iters, device)}

    unprune_(model)
    bar = tqdm(total=len(jobs) + 1, desc=f"prune sweep {label}".strip(), unit="point", disable=not progress,
               dynamic_ncols=True)
    try:
        rows = [{"label": label, "method": "none", "alpha": None, "keep_rate": 1.0, **measured(),
                 "tokens": str(n0), "blocks": "", "placement": "", "fuse": False}]
        bar.update(1)
        for m, a, k in jobs:
            cfg = method_config(m, a, k, **options)
            bar.set_postfix(method=cfg.label, keep=k)
            report = prune_(model, cfg)
            alpha = cfg.order if m == "renyi" else None
            rows.append({"label": label, "method": m, "alpha": "inf" if alpha == math.inf else alpha,  # JSON: no inf
                         "keep_rate": k, **measured(), "tokens": "-".join(map(str, report.tokens_per_stage)),
                         "blocks": "-".join(map(str, report.blocks)), "placement": cfg.placement,
                         "fuse": cfg.fuse_tokens})
            bar.update(1)
    finally:
        bar.close()
        unprune_(model)
    return rows


def row_label(row: dict[str, Any]) -> str:
    """Display name of a sweep row's method."""
    m = row["method"]
    if m == "renyi":
        a = row["alpha"]
        return f"Rényi α={'∞' if a in ('inf', math.inf) else f'{float(a):g}'}"
    return {"shannon": "Shannon", "evit": "EViT", "random": "random", "none": "unpruned"}.get(m, m)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of sweep rows (Δ top-1 against the unpruned row when there is one)."""
    base = next((r for r in rows if r["method"] == "none"), None)
    ft = any("top1_finetuned" in r for r in rows)
    head = ["method", "κ", "tokens per stage", "top-1 (%)", "Δ top-1", "GFLOPs", "images/s"]
    if ft:
        head.append("top-1 fine-tuned (%)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = f"{r['top1'] - base['top1']:+.2f}" if base is not None and r is not base else ""
        ips = r.get("images_per_s")
        cells = [row_label(r), f"{r['keep_rate']:g}", str(r["tokens"]).replace("-", "→"), f"{r['top1']:.2f}", delta,
                 f"{r['gflops']:.4f}" if r["gflops"] < 0.1 else f"{r['gflops']:.2f}",
                 f"{ips:.0f}" if ips is not None else ""]
        if ft:
            v = r.get("top1_finetuned")
            cells.append(f"{v:.2f}" if v is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def prune_table(model: nn.Module, train_ds, test_ds, keep_rates: Sequence[float] = (0.7, 0.5),
                methods: Sequence[tuple[str, Optional[float]]] = (("shannon", None), ("renyi", 2.0), ("evit", None),
                                                                   ("random", None)),
                finetune_epochs: int = 0, finetune_lr: float = 1e-4, batch_size: int = 256,
                device: torch.device | str | None = None, progress: bool = True,
                throughput_batch: int = 64) -> tuple[list[dict[str, Any]], str]:
    """The demo's pruning table: off-the-shelf top-1, GFLOPs and images/s per (method, κ).

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

    Returns:
        ``(rows, markdown)``.
    """
    rows = prune_sweep(model, test_ds, keep_rates, methods, batch_size=batch_size, device=device,
                       throughput_batch=throughput_batch, progress=progress, label="off the shelf")
    if finetune_epochs > 0:
        import copy

        from eamvit.methods.evaluate import evaluate
        from eamvit.methods.finetune import FinetuneConfig, finetune

        ftc = FinetuneConfig(epochs=finetune_epochs, lr=finetune_lr, min_lr=finetune_lr / 10, batch_size=64)
        for r in rows:
            if r["method"] == "none":
                continue
            alpha = math.inf if r["alpha"] == "inf" else r["alpha"]
            m = copy.deepcopy(model)
            prune_(m, method_config(r["method"], alpha, r["keep_rate"]))
            finetune(m, train_ds, ftc, progress=progress, device=device)
            r["top1_finetuned"] = evaluate(m, test_ds, batch_size=batch_size, device=device, progress=False)["top1"]
    return rows, markdown_table(rows)
