"""Token-pruning sweeps and the demo's pruning table: top-1, GMACs and images/s per (method, κ), token merging
beside them at equal work, on the sweep runner. Design: ``docs/architecture-experiments.md``, "prune_sweep".
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from eamvit.errors import EamError
from eamvit.experiments.results import Column, ResultRow, markdown
from eamvit.experiments.runner import Applied, EvalData, Point, Timing, run_sweep
from eamvit.methods.models import patch_grid
from eamvit.methods.cost import count_gflops
from eamvit.methods.finetune import FinetuneConfig, finetune
from eamvit.methods.merge import MergeConfig, merge_, r_for_gmacs, unmerge_
from eamvit.methods.prune import (PruneConfig, check_keep_rate, kept_patch_masks, method_config, parse_methods, prune_,
                                 setting_text, token_entropies, unprune_)
from eamvit.methods.reduce import row_label
from eamvit.methods.state import state_of
from eamvit.ops.merge import token_counts as merged_tokens

KEEP_RATES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
SWEEP_METHODS: tuple[tuple[str, Optional[float]], ...] = (
    ("shannon", None), ("renyi", 0.5), ("renyi", 2.0), ("renyi", 3.0), ("renyi", math.inf), ("evit", None),
    ("random", None))
# Merging at each κ's GMACs: ToMe, and entropy-guided merging (Shannon).
SWEEP_MERGES: tuple[MergeConfig, ...] = (MergeConfig(selection="tome"), MergeConfig(selection="entropy"))
MERGE_METHODS = {"tome": "tome", "entropy-merge": "entropy"}  # --methods names of merging → its selection


def parse_sweep_methods(text: str) -> tuple[list[tuple[str, Optional[float]]], list[MergeConfig]]:
    """``--methods`` of the sweeps: pruning methods (:func:`eamvit.methods.prune.parse_methods`) and merging ones
    (``tome``, ``entropy-merge`` for Shannon, ``entropy-merge:ORDER`` for Rényi), as
    ``([(pruning method, alpha)], [merging config without its r])``."""
    pruning, merging = [], []
    for part in (p.strip() for p in text.split(",")):
        name, _, order = part.partition(":")
        selection = MERGE_METHODS.get(name.strip().lower())
        if selection is None:
            pruning.append(part)
            continue
        if order and selection == "tome":
            raise EamError(f"method {part!r}: ToMe has no entropy order; write tome, or entropy-merge:{order}")
        try:
            alpha = (math.inf if order.strip().lower() in ("inf", "∞") else float(order)) if order else None
        except ValueError:
            raise EamError(f"cannot read Rényi order {order!r} in {part!r}; write e.g. entropy-merge:2") from None
        merging.append(MergeConfig(selection=selection, alpha=alpha))
    text = ",".join(p for p in pruning if p)
    if not text and not merging:
        raise EamError("no methods given; e.g. shannon,renyi:2,evit,random,tome,entropy-merge")
    return (parse_methods(text) if text else []), merging


def merged_fields(model: nn.Module) -> dict[str, Any]:
    """Result-row fields of a merging model, from its merging state: ``merge``, ``alpha``, ``merge_r``
    (each block's count after ToMe's cap), ``prop_attn``, ``tokens`` (patch tokens) and ``blocks``."""
    st = state_of(model).merge
    cfg: MergeConfig = st.config
    grid = patch_grid(model)
    tokens = merged_tokens((grid[0] * grid[1] if grid else 0) + st.num_prefix, st.num_prefix, st.r, cfg.selection)
    rs = [a - b for a, b in zip(tokens, tokens[1:])]
    return {"merge": cfg.selection, "alpha": None if cfg.alpha is None else setting_text(cfg.alpha),
            "merge_r": str(rs[0]) if len(set(rs)) == 1 else "-".join(map(str, rs)), "prop_attn": cfg.prop_attn,
            "tokens": "-".join(str(t - st.num_prefix) for t in tokens), "blocks": "-".join(map(str, st.blocks))}


def matched_merges(model: nn.Module, keep_rates: Sequence[float], merges: Sequence[MergeConfig],
                   options: dict[str, Any]) -> list[tuple[float, MergeConfig]]:
    """``(κ, merging config)`` for every κ and merging: ``r`` chosen to match the executed GMACs of Shannon
    pruning at κ with the pruning ``options`` (:func:`~eamvit.methods.merge.r_for_gmacs`)."""
    out = []
    for k in keep_rates:
        target = pruned_gflops(model, method_config("shannon", None, k, **options))
        out += [(k, r_for_gmacs(model, target, m)[0]) for m in merges]
    return out


def pruned_gflops(model: nn.Module, config: PruneConfig) -> float:
    """GMACs per image of ``model`` pruned with ``config`` (left unpruned)."""
    prune_(model, config)
    try:
        return count_gflops(model)
    finally:
        unprune_(model)


@contextmanager
def _unpruned(model: nn.Module, seed: int) -> Iterator[Applied]:
    grid = patch_grid(model)
    yield Applied({"gmacs": round(count_gflops(model), 4), "tokens": str(grid[0] * grid[1] if grid else 0),
                   "blocks": "", "placement": "", "fuse": False})


def pruned_state(config: PruneConfig, measure: Optional[Callable[[nn.Module], dict[str, Any]]] = None):
    """A sweep point's state: ``model`` pruned with ``config``; the row gets GMACs, tokens per stage,
    blocks, placement, fusion and what ``measure(pruned model)`` returns."""
    @contextmanager
    def state(model: nn.Module, seed: int) -> Iterator[Applied]:
        prune_(model, config)
        fields = {"gmacs": round(count_gflops(model), 4), **(measure(model) if measure is not None else {})}
        # Counting and measuring drew from random pruning's stream: prune afresh, as `eval --prune random` does.
        report = prune_(model, config)
        try:
            yield Applied({**fields, "tokens": "-".join(map(str, report.tokens_per_stage)),
                           "blocks": "-".join(map(str, report.blocks)), "placement": config.placement,
                           "fuse": config.fuse_tokens})
        finally:
            unprune_(model)
    return state


def merged_state(config: MergeConfig, measure: Optional[Callable[[nn.Module], dict[str, Any]]] = None):
    """A sweep point's state: ``model`` merging with ``config``; the row gets GMACs, :func:`merged_fields`
    and what ``measure(merged model)`` returns."""
    @contextmanager
    def state(model: nn.Module, seed: int) -> Iterator[Applied]:
        merge_(model, config)
        try:
            yield Applied({"gmacs": round(count_gflops(model), 4), **merged_fields(model),
                           **(measure(model) if measure is not None else {})})
        finally:
            unmerge_(model)
    return state


def reduce_points(base: dict[str, Any], prunes: Sequence[PruneConfig], merges: Sequence[tuple[float, MergeConfig]],
                  measure: Optional[Callable[[nn.Module], dict[str, Any]]] = None) -> list[Point]:
    """Points that prune with each of ``prunes``, then merge with each ``(κ it matches, config)`` of ``merges``,
    their rows labelled on top of ``base``."""
    points = [Point({**base, "prune": c.method, "alpha": setting_text(c.order) if c.method == "renyi" else None,
                     "keep_rate": c.keep_rate}, pruned_state(c, measure)) for c in prunes]
    return points + [Point({**base, "matched_keep_rate": k}, merged_state(c, measure)) for k, c in merges]


def merge_columns(base: dict[str, Any], merges: Sequence[Any]) -> dict[str, Any]:
    """``base`` with the merging label fields (empty) when there are merging points."""
    return {**base, **({"merge": None, "merge_r": None, "matched_keep_rate": None} if merges else {})}


def prune_sweep(model: nn.Module, data: EvalData, keep_rates: Sequence[float] = KEEP_RATES,
                methods: Sequence[tuple[str, Optional[float]]] = SWEEP_METHODS,
                timing: Optional[Timing] = Timing(warmup=1), progress: bool = True, label: str = "",
                merges: Sequence[MergeConfig] = (), **options: Any) -> list[ResultRow]:
    """Top-1, GMACs and images/s for every (method, κ), off the shelf, and every merging at each κ's GMACs
    (:func:`matched_merges`); the first row is the unmodified model. The model is left unpruned and unmerged.

    Args:
        methods: ``(method, alpha)`` pairs (alpha ``None`` except for ``"renyi"``).
        timing: how images/s are timed; ``None``: not timed.
        label: copied into every row.
        merges: merging configs (their ``r`` is chosen per κ), e.g. :data:`SWEEP_MERGES`.
        **options: further :class:`PruneConfig` fields (``blocks``, ``placement``, ``keys``, ``fuse``).
    """
    unprune_(model)
    unmerge_(model)
    base = merge_columns({"label": label, "prune": None, "alpha": None, "keep_rate": None}, merges)
    for k in keep_rates:  # every point's config is checked before any work is done
        check_keep_rate(k)
    jobs = [method_config(m, a, k, **options) for k in keep_rates for m, a in methods]
    matched = matched_merges(model, keep_rates, merges, options)
    points = [Point(base, _unpruned)]
    for k in keep_rates:
        points += reduce_points(base, [c for c in jobs if c.keep_rate == k], [m for m in matched if m[0] == k])
    return run_sweep(model, data, points, timing=timing, progress=progress, desc=f"prune sweep {label}".strip())


def kappa(row: Mapping[str, Any]) -> Optional[float]:
    """A row's κ; a merging row's is the κ whose GMACs it matches."""
    return row.get("matched_keep_rate") if row.get("merge") else row["keep_rate"]


def markdown_table(rows: Sequence[ResultRow | dict[str, Any]]) -> str:
    """Markdown table of sweep rows, Δ top-1 against the unmodified row when there is one."""
    base = next((r for r in rows if not r["prune"] and not r.get("merge")), None)
    merging = any(r.get("merge") for r in rows)
    delta = lambda r: r["top1"] - base["top1"] if base is not None and r is not base else None
    columns = [Column("method", derive=row_label),
               Column("keep_rate", "κ (merging: its GMACs)" if merging else "κ", "g", derive=kappa)]
    if merging:
        columns.append(Column("merge_r", "r per block"))
    columns += [Column("tokens", "patch tokens per stage", derive=lambda r: str(r["tokens"]).replace("-", "→")),
                Column("top1", "top-1 (%)", ".2f"), Column("delta", "Δ top-1", "+.2f", derive=delta),
                Column("gmacs", "GMACs", lambda v: f"{v:.{4 if v < 0.1 else 2}f}"),
                Column("images_per_s", "images/s", ".0f")]
    if any(r.get("top1_finetuned") is not None for r in rows):
        columns.append(Column("top1_finetuned", "top-1 fine-tuned (%)", ".2f"))
    return markdown(rows, columns)


def prune_table(model: nn.Module, train_ds, test_ds, keep_rates: Sequence[float] = (0.7, 0.5),
                methods: Sequence[tuple[str, Optional[float]]] = (("shannon", None), ("renyi", 2.0), ("evit", None),
                                                                   ("random", None)),
                finetune_epochs: int = 0, finetune_lr: float = 1e-4, batch_size: int = 256,
                device: torch.device | str | None = None, progress: bool = True,
                throughput_batch: int = 64, data_config: Optional[dict] = None,
                merges: Sequence[MergeConfig] = ()) -> tuple[list[ResultRow], str]:
    """The demo's pruning table, ``(rows, markdown)``: :func:`prune_sweep` off the shelf.

    Args:
        train_ds: training split, used only when ``finetune_epochs > 0``.
        finetune_epochs: if > 0, each row is also fine-tuned (a copy of the model, the EViT recipe
            with this many epochs and ``finetune_lr`` as peak) and ``top1_finetuned`` is added.
        throughput_batch: images per timed forward.
        data_config: the data config ``test_ds`` was built with (recorded in the rows).
    """
    data = EvalData(test_ds, batch_size=batch_size, device=device, data_config=data_config)
    rows = prune_sweep(model, data, keep_rates, methods, Timing(batch_size=throughput_batch, warmup=1),
                       progress=progress, label="off the shelf", merges=merges)
    if finetune_epochs > 0:
        ftc = FinetuneConfig(epochs=finetune_epochs, lr=finetune_lr, min_lr=finetune_lr / 10, batch_size=64)
        for r in rows:
            if not r["prune"] and not r.get("merge"):
                continue
            alpha = math.inf if r["alpha"] == "inf" else r["alpha"]
            m = copy.deepcopy(model)
            if r["prune"]:
                prune_(m, method_config(r["prune"], alpha, r["keep_rate"]))
            else:  # matched_merges' one r: the first block's count, the later ones capped alike
                merge_(m, MergeConfig(r=int(str(r["merge_r"]).split("-")[0]), selection=r["merge"], alpha=alpha))
            finetune(m, train_ds, ftc, progress=progress, device=device)
            r.fields["top1_finetuned"] = data.evaluate(m)["top1"]
    return rows, markdown_table(rows)


ENTROPY_ORDERS = (1.0, 2.0, 3.0, math.inf)  # the Rényi orders of the seed's Fig. 5


def figure_data(model: nn.Module, images: torch.Tensor,
                configs: Sequence[PruneConfig]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the seed's Fig. 4 and Fig. 5 show: the patches each of ``configs`` keeps at every stage of the first
    image, and the patch tokens' attention entropy per block for :data:`ENTROPY_ORDERS` over all ``images``
    (a batch on the model's device)."""
    return kept_patch_masks(model, images[0], configs), token_entropies(model, images, ENTROPY_ORDERS)
