"""EAM on a RepQ-ViT-quantized model: the paper's Fig. 5/6 curves, Table 1 and a size report.

:func:`quant_sweep` evaluates, for every sparsity τ:

* ``fp``: the full-precision model (τ-independent);
* ``repq``: the RepQ-ViT baseline (τ-independent);
* ``eam``: the quantized model with the τ lowest-entropy entries frozen, over two independent axes
  that the paper names confusingly: ``maps`` — entropy maps (and mean maps ``A^μ``) computed on the
  full-precision model (``"fp"``, the paper's EAM_FP32 of §5.2.1) or on the quantized model
  (``"quant"``, its EAM_4bits of §5.2.1) — and ``values`` — frozen values kept in fp32 (EAM_32bits
  of §5.1) or quantized with the post-softmax quantizer at ``a_bits`` with each layer's calibrated Δ
  (EAM_4bits of §5.1);
* ``random``: random freezing of the same number of entries on the quantized model (§5.2.2), with
  the quantized model's mean maps and quantized values, averaged over seeds.

Rows name the model's quantization ``quant`` (``fp`` or ``repq``) and ``bits`` (W/A), and for the
freezing rows the ``selection`` (``entropy`` for EAM, ``random``), ``maps`` and ``value_bits`` (32:
fp32 values); those three are blank on the FP and RepQ-ViT rows. Every row carries a size report
(:func:`size_report`, model bytes from :func:`eamvit.experiments.size.model_size`). The sweep runs on
:func:`eamvit.experiments.runner.run_sweep`.
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
        taus: sparsity levels τ.
        scope: freezing scope (``"head"``, ``"layer"``, ``"global"``; see :mod:`eamvit.methods.freeze`).
        entropy_bits: histogram bits of the entropy maps.
        frozen_bits: bits of the quantized frozen values (default: the model's ``a_bits``).
        random_seeds: seeds of random freezing (mean and std reported).
        maps: which entropy maps to use: ``("fp", "quant")``.
        values: frozen-value precisions: ``("fp32", "quant")``.
        max_memory: histogram budget per model in bytes (more passes above it); ``None``: no limit.
        table_maps / table_values: the EAM variant reported in Table 1 (the paper's EAM_4bits:
            quantized-model maps, quantized values).
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


# --------------------------------------------------------------------------- sizes


def size_report(model: nn.Module, report: Optional[FreezeReport] = None, value_bits: Optional[int] = None,
                attention_entries: Optional[int] = None) -> dict[str, Any]:
    """Model bytes (:func:`~eamvit.experiments.size.model_size`), frozen-map bytes and the attention work
    frozen entries save.

    Frozen maps store one bit per attention entry (the mask) plus the frozen values at
    ``value_bits`` (32 for fp32). Per image, every frozen entry is one score ``q·k`` (``head_dim``
    multiply-adds) that no longer needs computing.

    Args:
        model: the (quantized) model.
        report: the :class:`~eamvit.methods.freeze.FreezeReport` of the freeze applied, if any.
        value_bits: bits of the frozen values (``None``: fp32).
        attention_entries: attention entries per image (taken from ``report`` when given).
    """
    out: dict[str, Any] = model_size(model).to_dict()
    frozen = report.frozen if report is not None else 0
    total = report.total if report is not None else attention_entries
    vb = 32 if value_bits is None else value_bits
    mask_bytes = (total + 7) // 8 if frozen else 0
    value_bytes = (frozen * vb + 7) // 8
    macs = 0
    if report is not None:
        for layer, k in zip(attention_layers(model), report.frozen_per_layer):
            macs += k * int(getattr(layer, "head_dim", layer.qkv.in_features // layer.num_heads))
    out.update(frozen_map_bytes=mask_bytes + value_bytes,
               total_bytes=out["model_bytes"] + mask_bytes + value_bytes,
               attention_entries=total, entries_skipped=frozen, qk_macs_skipped=macs)
    return out


# --------------------------------------------------------------------------- sweep


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
    vq = qcfg.attn_quantizer  # frozen values use the post-softmax quantizer (and its Δ), as EAM_4bits

    freeze = FreezeConfig(scope=sweep.scope, value_quantizer=vq)

    def point(tau: float, selection: str, mp: str, vals: str, seeds: Sequence[int]) -> Point:
        vb = fbits if vals == "quant" else None
        cfg = replace(freeze, tau=tau, selection=selection, value_bits=vb)
        fields = {"tau": tau, "quant": "repq", "bits": wa, "selection": selection, "maps": mp,
                  "value_bits": vb or 32}
        return freeze_point(maps[mp], cfg, fields, seeds, deltas if vb else None,
                            measure=lambda m, rep: size_report(m, rep, vb))

    frozen = []
    for tau in sweep.taus:
        frozen += [point(tau, "entropy", mp, vals, (0,)) for mp in sweep.maps for vals in sweep.values]
        frozen.append(point(tau, "random", "quant", "quant", sweep.random_seeds))
    return base, frozen


def _quantized(fp_model: nn.Module, config: RepQConfig, calib: torch.Tensor | Dataset,
               q_model: Optional[nn.Module]) -> nn.Module:
    if q_model is None:
        q_model = quantize_(copy.deepcopy(fp_model), config, calib, progress=False)
    if step_config(q_model, "quant") is None:
        raise EamError("q_model is not quantized; pass a model from quantize_ or leave q_model out")
    return q_model


def quant_sweep(fp_model: nn.Module, data: EvalData, calib_dataset: Dataset,
                config: Optional[RepQConfig] = None, sweep: Optional[QuantSweepConfig] = None, *,
                map_indices: Optional[Sequence[int]] = None, repq_calib: torch.Tensor | Dataset | None = None,
                q_model: Optional[nn.Module] = None, progress: bool = True) -> dict[str, Any]:
    """The paper's quantized sweep: FP, RepQ-ViT and EAM variants for every τ.

    Args:
        fp_model: the full-precision model (left unchanged).
        data: the evaluation images (:class:`~eamvit.experiments.runner.EvalData`); its batch size,
            workers and device serve the entropy maps too, its data config is recorded in the rows.
        calib_dataset: images for the entropy maps (and RepQ calibration unless ``repq_calib``).
        config: :class:`~eamvit.methods.repq.RepQConfig` (W4/A4 by default).
        sweep: :class:`QuantSweepConfig`.
        map_indices: entropy-map images of ``calib_dataset`` (all by default), the same for both models.
        repq_calib: RepQ calibration images (a seeded random ``calib_size`` of ``calib_dataset`` by default).
        q_model: an already quantized copy of ``fp_model`` (skips calibration).
        progress: progress bars.

    Returns:
        ``rows`` (one :class:`~eamvit.experiments.results.ResultRow` per τ and method; the FP and
        RepQ-ViT rows repeat at every τ), ``kl`` (:class:`~eamvit.methods.kl.KLMaps` of FP vs
        quantized), ``table1`` (Table 1 as ``(rows, columns)``), ``table`` (its markdown), ``q_model``.
    """
    config = config or RepQConfig()
    sweep = sweep or QuantSweepConfig()
    fbits = sweep.frozen_bits if sweep.frozen_bits is not None else config.a_bits
    q_model = _quantized(fp_model, config, repq_calib if repq_calib is not None else calib_dataset, q_model)
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


# --------------------------------------------------------------------------- tables


def table1(rows: Sequence[ResultRow | dict], model_name: str, taus: Sequence[float] = (0.1, 0.2),
           maps: str = "quant", value_bits: int = 4) -> tuple[list[dict[str, Any]], list[Column]]:
    """The paper's Table 1 for one model: FP, RepQ-ViT and EAM at τ = 10 % and 20 % (top-1, %).

    Args:
        rows: rows of :func:`quant_sweep`.
        model_name: the header of the accuracy column.
        taus: the sparsity levels reported.
        maps: which maps the EAM rows use (``"quant"``: the paper's EAM_4bits).
        value_bits: bits of the frozen values of the EAM rows (32: fp32).

    Returns:
        ``(rows, columns)`` for :func:`~eamvit.experiments.results.markdown` or ``write_table``.
    """
    def pick(quant: str, tau: Optional[float] = None) -> Optional[ResultRow | dict]:
        for r in rows:
            if r["quant"] != quant or (r.get("selection") is not None) != (tau is not None):
                continue
            if tau is not None and (r["selection"] != "entropy" or r["maps"] != maps or r["value_bits"] != value_bits
                                    or not math.isclose(r["tau"], tau)):
                continue
            return r
        return None

    out = []
    for name, r in (("Full-Precision", pick("fp")), ("RepQ-ViT", pick("repq"))):
        if r is not None:
            out.append({"method": name, "bits": r["bits"], "top1": r["top1"]})
    for t in taus:
        r = pick("repq", t)
        if r is not None:
            out.append({"method": f"EAM_{value_bits}bits (τ={round(100 * t)}%, maps from "
                                  f"{'quantized' if maps == 'quant' else 'FP'} model)",
                        "bits": r["bits"], "top1": r["top1"]})
    return out, [Column("method", "Method"), Column("bits", "Prec. (W/A)"), Column("top1", model_name, ".2f")]


SIZE_COLUMNS = [Column("tau", "τ", ".1f"), Column("quant"), Column("selection"), Column("maps"),
                Column("value_bits", "value bits"),
                Column("model_bytes", "model bytes", ","), Column("frozen_map_bytes", "frozen-map bytes", ","),
                Column("total_bytes", "total bytes", ","), Column("entries_skipped", "entries skipped", ","),
                Column("qk_macs_skipped", "q·k MACs skipped", ",")]


def size_table(rows: Sequence[ResultRow | dict]) -> tuple[list[ResultRow | dict], list[Column]]:
    """The size report: one line per method/maps/values at each τ (FP and RepQ-ViT once).

    Returns:
        ``(rows, columns)`` for :func:`~eamvit.experiments.results.markdown` or ``write_table``.
    """
    first = rows[0]["tau"] if rows else None
    return [r for r in rows if r.get("selection") is not None or r["tau"] == first], SIZE_COLUMNS
