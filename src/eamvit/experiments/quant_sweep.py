"""EAM on a RepQ-ViT-quantized model: the paper's Fig. 5/6 curves, Table 1 and a size report, on the sweep runner.
The variants and the rows: ``docs/architecture-experiments.md``, "quant_sweep".
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from eamvit.methods.state import state_of, step_config
from eamvit.choices import Scope
from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.experiments.freeze_sweep import freeze_point
from eamvit.experiments.results import Column, ResultRow, markdown
from eamvit.experiments.runner import Applied, EvalData, Point, run_sweep
from eamvit.experiments.size import model_size
from eamvit.methods.calibrate import CalibOptions
from eamvit.methods.freeze import FreezeConfig, FreezeReport
from eamvit.methods.kl import KLMaps, compute_kl_maps
from eamvit.methods.quantize import quantize_
from eamvit.methods.repq import RepQConfig, attn_deltas
from eamvit.modules.attention import attention_layers

DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(10))
MapsOf = Literal["fp", "quant"]  # entropy maps of the full-precision or of the quantized model
FrozenValues = Literal["fp32", "quant"]


@dataclass(frozen=True)
class QuantSweepConfig(Config):
    """What :func:`quant_sweep` runs.

    Args:
        scope: freezing scope (``"head"``, ``"layer"``, ``"global"``; see :mod:`eamvit.methods.freeze`).
        entropy_bits: histogram bits of the entropy maps.
        frozen_bits: bits of the quantized frozen values (default: the model's ``a_bits``).
        maps: which entropy maps to use: of the full-precision model (``"fp"``), of the quantized one (``"quant"``).
        values: frozen-value precisions: ``"fp32"``, ``"quant"``.
        max_memory: histogram budget per model in bytes (more passes above it); ``None``: no limit.
        table_maps / table_values: the EAM variant reported in Table 1 (the paper's EAM_4bits by default).
    """

    taus: tuple[float, ...] = DEFAULT_TAUS
    scope: Scope = "head"
    entropy_bits: int = 8
    frozen_bits: Optional[int] = None
    random_seeds: tuple[int, ...] = (0, 1, 2)
    maps: tuple[MapsOf, ...] = ("fp", "quant")
    values: tuple[FrozenValues, ...] = ("fp32", "quant")
    max_memory: Optional[int] = None
    table_maps: MapsOf = "quant"
    table_values: FrozenValues = "quant"

    KIND = "quant-sweep"
    VERSION = 1

    def _check(self) -> None:
        if not self.taus:
            raise EamError("give at least one sparsity level τ")
        for t in self.taus:
            FreezeConfig(tau=t, scope=self.scope)


def size_report(model: nn.Module, report: Optional[FreezeReport] = None, value_bits: Optional[int] = None,
                attention_entries: Optional[int] = None) -> dict[str, Any]:
    """Model bytes (:func:`~eamvit.experiments.size.model_size`), frozen-map bytes (a 1-bit mask plus the values)
    and the ``q·k`` multiply-adds frozen entries save per image.

    Args:
        report: the freeze applied, if any.
        value_bits: bits of the frozen values (``None``: fp32).
        attention_entries: attention entries per image (taken from ``report`` when given).
    """
    out: dict[str, Any] = model_size(model).to_dict()
    frozen = report.frozen if report is not None else 0
    total = report.total if report is not None else attention_entries
    vb = 32 if value_bits is None else value_bits
    mask_bytes = (total + 7) // 8 if frozen else 0
    value_bytes = (frozen * vb + 7) // 8
    macs = sum(k * int(getattr(layer, "head_dim", layer.qkv.in_features // layer.num_heads))
               for layer, k in zip(attention_layers(model), report.frozen_per_layer)) if report is not None else 0
    out.update(frozen_map_bytes=mask_bytes + value_bytes,
               total_bytes=out["model_bytes"] + mask_bytes + value_bytes,
               attention_entries=total, entries_skipped=frozen, qk_macs_skipped=macs)
    return out


def _baseline(model: nn.Module, fields: dict[str, Any], entries: int) -> Point:
    """FP or RepQ-ViT as they are (τ-independent), with their size report."""
    @contextmanager
    def as_is(_: nn.Module, seed: int) -> Iterator[Applied]:
        yield Applied({"frozen_fraction": 0.0, **size_report(model, attention_entries=entries)}, model=model)

    return Point(fields, as_is)


def _points(fp_model: nn.Module, q_model: nn.Module, kl: KLMaps, sweep: "QuantSweepConfig",
            fbits: int) -> tuple[list[Point], list[Point]]:
    """``(baselines, freezing points)`` of the sweep, in row order."""
    qcfg = step_config(q_model, "quant")
    entries = sum(m.numel() for m in kl.fp.entropy)
    wa = f"{qcfg.w_bits}/{qcfg.a_bits}"
    unfrozen = {"selection": None, "maps": None, "value_bits": None}
    base = [_baseline(fp_model, {"quant": "fp", "bits": "32/32", **unfrozen}, entries),
            _baseline(q_model, {"quant": "repq", "bits": wa, **unfrozen}, entries)]
    maps = {"fp": kl.fp, "quant": kl.quant}
    deltas = attn_deltas(q_model) if qcfg.attn_quantizer != "uniform" else None
    # Frozen values use the post-softmax quantizer (and its Δ), as EAM_4bits.
    freeze = FreezeConfig(scope=sweep.scope, value_quantizer=qcfg.attn_quantizer)

    def point(tau: float, selection: str, mp: str, vals: str, seeds: Sequence[int]) -> Point:
        vb = fbits if vals == "quant" else None
        fields = {"tau": tau, "quant": "repq", "bits": wa, "selection": selection, "maps": mp,
                  "value_bits": vb or 32}
        return freeze_point(maps[mp], replace(freeze, tau=tau, selection=selection, value_bits=vb), fields, seeds,
                            deltas if vb else None, measure=lambda m, rep: size_report(m, rep, vb))

    frozen = []
    for tau in sweep.taus:
        frozen += [point(tau, "entropy", mp, vals, (0,)) for mp in sweep.maps for vals in sweep.values]
        frozen.append(point(tau, "random", "quant", "quant", sweep.random_seeds))
    return base, frozen


def quant_sweep(fp_model: nn.Module, data: EvalData, calib_dataset: Dataset,
                config: Optional[RepQConfig] = None, sweep: Optional[QuantSweepConfig] = None, *,
                map_indices: Optional[Sequence[int]] = None, repq_calib: torch.Tensor | Dataset | None = None,
                q_model: Optional[nn.Module] = None, progress: bool = True) -> dict[str, Any]:
    """The paper's quantized sweep: FP, RepQ-ViT and EAM variants for every τ.

    Args:
        fp_model: the full-precision model (left unchanged).
        data: the evaluation images; its batch size, workers and device serve the entropy maps too.
        calib_dataset: images for the entropy maps (and RepQ calibration unless ``repq_calib``).
        config: W4/A4 by default.
        map_indices: entropy-map images of ``calib_dataset`` (all by default), the same for both models.
        repq_calib: RepQ calibration images (a seeded random ``calib_size`` of ``calib_dataset`` by default).
        q_model: an already quantized copy of ``fp_model`` (skips calibration).

    Returns:
        ``rows`` (one per τ and method; the FP and RepQ-ViT rows repeat at every τ), ``kl`` (FP vs quantized),
        ``table1`` (Table 1 as ``(rows, columns)``), ``table`` (its markdown), ``q_model``.
    """
    config = config or RepQConfig()
    sweep = sweep or QuantSweepConfig()
    fbits = sweep.frozen_bits if sweep.frozen_bits is not None else config.a_bits
    if q_model is None:
        calib = repq_calib if repq_calib is not None else calib_dataset
        q_model = quantize_(copy.deepcopy(fp_model), config, calib, progress=False)
    if step_config(q_model, "quant") is None:
        raise EamError("q_model is not quantized; pass a model from quantize_ or leave q_model out")
    kl = compute_kl_maps(fp_model, q_model, calib_dataset, indices=map_indices, bits=sweep.entropy_bits,
                         batch_size=data.batch_size, progress=progress, options=CalibOptions(
                             workers=data.workers, device=data.device, max_memory=sweep.max_memory))
    base, frozen = _points(fp_model, q_model, kl, sweep, fbits)
    run = run_sweep(q_model, data, base + frozen, progress=progress, desc="quant sweep")
    base_rows, frozen_rows = run[:len(base)], run[len(base):]
    rows: list[ResultRow] = []
    for tau in sweep.taus:  # the τ-independent baselines repeat at every τ, so each τ has its full set
        rows += [replace(r, fields={"tau": tau, **r.fields}) for r in base_rows]
        rows += [r for r in frozen_rows if r["tau"] == tau]
    label = getattr(state_of(fp_model).spec, "name", type(fp_model).__name__)
    t1 = table1(rows, label, maps=sweep.table_maps, value_bits=fbits if sweep.table_values == "quant" else 32)
    return {"rows": rows, "kl": kl, "table1": t1, "table": markdown(*t1), "q_model": q_model}


def table1(rows: Sequence[ResultRow | dict], model_name: str, taus: Sequence[float] = (0.1, 0.2),
           maps: str = "quant", value_bits: int = 4) -> tuple[list[dict[str, Any]], list[Column]]:
    """The paper's Table 1 for one model as ``(rows, columns)``: FP, RepQ-ViT and EAM at ``taus`` (top-1, %).

    Args:
        model_name: the header of the accuracy column.
        maps: which maps the EAM rows use (``"quant"``: the paper's EAM_4bits).
        value_bits: bits of the frozen values of the EAM rows (32: fp32).
    """
    def pick(quant: str, tau: Optional[float] = None) -> Optional[ResultRow | dict]:
        return next((r for r in rows if r["quant"] == quant and (r.get("selection") is not None) == (tau is not None)
                     and (tau is None or (r["selection"], r["maps"], r["value_bits"]) == ("entropy", maps, value_bits)
                          and math.isclose(r["tau"], tau))), None)

    eam = f"EAM_{value_bits}bits (τ={{}}%, maps from {'quantized' if maps == 'quant' else 'FP'} model)"
    picked = [("Full-Precision", pick("fp")), ("RepQ-ViT", pick("repq"))]
    picked += [(eam.format(round(100 * t)), pick("repq", t)) for t in taus]
    out = [{"method": name, "bits": r["bits"], "top1": r["top1"]} for name, r in picked if r is not None]
    return out, [Column("method", "Method"), Column("bits", "Prec. (W/A)"), Column("top1", model_name, ".2f")]


SIZE_COLUMNS = [Column("tau", "τ", ".1f"), Column("quant"), Column("selection"), Column("maps"),
                Column("value_bits", "value bits"),
                Column("model_bytes", "model bytes", ","), Column("frozen_map_bytes", "frozen-map bytes", ","),
                Column("total_bytes", "total bytes", ","), Column("entries_skipped", "entries skipped", ","),
                Column("qk_macs_skipped", "q·k MACs skipped", ",")]


def size_table(rows: Sequence[ResultRow | dict]) -> tuple[list[ResultRow | dict], list[Column]]:
    """The size report as ``(rows, columns)``: one line per method/maps/values at each τ (FP and RepQ-ViT once)."""
    first = rows[0]["tau"] if rows else None
    return [r for r in rows if r.get("selection") is not None or r["tau"] == first], SIZE_COLUMNS
