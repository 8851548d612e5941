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

Every row carries a size report (:func:`size_report`).
"""
from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from eamvit.modules.attention import attention_layers
from eamvit.errors import EamError
from eamvit.methods.freeze import FreezeConfig, FreezeReport, freeze_, unfreeze_
from eamvit.methods.kl import compute_kl_maps
from eamvit.modules.quantizers import Quantizer
from eamvit.methods.quantize import quantize_
from eamvit.methods.repq import QuantConv2d, QuantLinear, RepQConfig, attn_deltas

DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(10))
EvaluateFn = Callable[..., dict]


@dataclass
class QuantSweepConfig:
    """What :func:`quant_sweep` runs.

    Args:
        taus: sparsity levels τ.
        scope: freezing scope (``"head"``, ``"layer"``, ``"global"``; see :mod:`eamvit.methods.freeze`).
        entropy_bits: histogram bits of the entropy maps.
        frozen_bits: bits of the quantized frozen values (default: the model's ``a_bits``).
        random_seeds: seeds of random freezing (mean and std reported).
        maps: which entropy maps to use: ``("fp", "quant")``.
        values: frozen-value precisions: ``("fp32", "quant")``.
        batch_size: images per forward.
        table_maps / table_values: the EAM variant reported in Table 1 (the paper's EAM_4bits:
            quantized-model maps, quantized values).
    """

    taus: tuple[float, ...] = DEFAULT_TAUS
    scope: str = "head"
    entropy_bits: int = 8
    frozen_bits: Optional[int] = None
    random_seeds: tuple[int, ...] = (0, 1, 2)
    maps: tuple[str, ...] = ("fp", "quant")
    values: tuple[str, ...] = ("fp32", "quant")
    batch_size: int = 64
    table_maps: str = "quant"
    table_values: str = "quant"

    def validate(self) -> "QuantSweepConfig":
        if not self.taus:
            raise EamError("give at least one sparsity level τ")
        for t in self.taus:
            FreezeConfig(tau=t, scope=self.scope).validate()
        if set(self.maps) - {"fp", "quant"} or set(self.values) - {"fp32", "quant"}:
            raise EamError("maps must be among fp, quant and values among fp32, quant")
        return self


# --------------------------------------------------------------------------- sizes


def _weight_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Storage of ``model`` with every weight at its bit width.

    Quantized weights count ``w_bits`` each (packed); everything else (biases, LayerNorm, embeddings,
    Swin's bias tables) 32 bits; quantizer parameters (Δ, zero points) 32 bits each.

    Returns:
        ``weight_bytes`` (quantized weights, packed), ``fp32_param_bytes``, ``quant_param_bytes``,
        ``model_bytes`` (their sum).
    """
    qweights = {id(m.weight): m.weight_quantizer.bits for m in _weight_modules(model) if m.weight_quantizer.enabled}
    wbits = sum(p.numel() * qweights[id(p)] for p in model.parameters() if id(p) in qweights)
    fp = sum(p.numel() * 4 for p in model.parameters() if id(p) not in qweights)
    qp = sum(4 * getattr(q, n).numel() for q in model.modules() if isinstance(q, Quantizer)
             for n in q._param_names if getattr(q, n) is not None)
    w = (wbits + 7) // 8
    return {"weight_bytes": w, "fp32_param_bytes": fp, "quant_param_bytes": qp, "model_bytes": w + fp + qp}


def size_report(model: nn.Module, report: Optional[FreezeReport] = None, value_bits: Optional[int] = None,
                attention_entries: Optional[int] = None) -> dict[str, Any]:
    """Model bytes, frozen-map bytes and the attention work frozen entries save.

    Frozen maps store one bit per attention entry (the mask) plus the frozen values at
    ``value_bits`` (32 for fp32). Per image, every frozen entry is one score ``q·k`` (``head_dim``
    multiply-adds) that no longer needs computing.

    Args:
        model: the (quantized) model.
        report: the :class:`~eamvit.freeze.FreezeReport` of the freeze applied, if any.
        value_bits: bits of the frozen values (``None``: fp32).
        attention_entries: attention entries per image (taken from ``report`` when given).
    """
    out: dict[str, Any] = dict(model_bytes(model))
    frozen = report.frozen if report is not None else 0
    total = report.total if report is not None else attention_entries
    vb = 32 if value_bits is None else value_bits
    mask_bytes = (total + 7) // 8 if frozen else 0
    value_bytes = (frozen * vb + 7) // 8
    macs = 0
    if report is not None:
        for layer, k in zip(attention_layers(model), report.frozen_per_layer):
            macs += k * int(getattr(layer, "head_dim", layer.qkv.in_features // layer.num_heads))
    out.update(frozen_value_bits=vb if frozen else None, frozen_map_bytes=mask_bytes + value_bytes,
               total_bytes=out["model_bytes"] + mask_bytes + value_bytes,
               attention_entries=total, entries_skipped=frozen, qk_macs_skipped=macs)
    return out


# --------------------------------------------------------------------------- sweep


def quant_sweep(fp_model: nn.Module, eval_dataset: Dataset, calib_dataset: Dataset,
                config: Optional[RepQConfig] = None, sweep: Optional[QuantSweepConfig] = None, *,
                eval_indices: Optional[Sequence[int]] = None, map_indices: Optional[Sequence[int]] = None,
                repq_calib: torch.Tensor | Dataset | None = None, q_model: Optional[nn.Module] = None,
                device: torch.device | str | None = None, workers: int = 0, progress: bool = True,
                max_memory: Optional[int] = None, evaluate_fn: Optional[EvaluateFn] = None) -> dict[str, Any]:
    """The paper's quantized sweep: FP, RepQ-ViT and EAM variants for every τ.

    Args:
        fp_model: the full-precision model (left unchanged).
        eval_dataset: the evaluation images.
        calib_dataset: images for the entropy maps (and RepQ calibration unless ``repq_calib``).
        config: :class:`~eamvit.methods.repq.RepQConfig` (W4/A4 by default).
        sweep: :class:`QuantSweepConfig`.
        eval_indices: evaluation subset (all by default).
        map_indices: entropy-map images of ``calib_dataset`` (all by default), the same for both models.
        repq_calib: RepQ calibration images (a seeded random ``calib_size`` of ``calib_dataset`` by default).
        q_model: an already quantized copy of ``fp_model`` (skips calibration).
        device: where to run.
        workers: DataLoader workers.
        progress: progress bars.
        max_memory: histogram budget per model in bytes (more passes above it).
        evaluate_fn: ``f(model, dataset, indices, batch_size=, workers=, device=, progress=) -> {"top1", "top5"}``
            (:func:`eamvit.evaluate.evaluate` by default).

    Returns:
        ``rows`` (one per τ and method), ``kl`` (:class:`~eamvit.kl.KLMaps` of FP vs quantized),
        ``table`` (Table 1 markdown), ``q_model``.
    """
    if evaluate_fn is None:
        from eamvit.methods.evaluate import evaluate as evaluate_fn
    config = (config or RepQConfig()).validate()
    sweep = (sweep or QuantSweepConfig()).validate()
    fbits = sweep.frozen_bits if sweep.frozen_bits is not None else config.a_bits
    if q_model is None:
        q_model = copy.deepcopy(fp_model)
        quantize_(q_model, config, repq_calib if repq_calib is not None else calib_dataset, progress=False)
    qcfg = getattr(q_model, "eam_quant_config", None)
    if qcfg is None:
        raise EamError("q_model is not quantized; pass a model from quantize_ or leave q_model out")
    ev = dict(batch_size=sweep.batch_size, workers=workers, device=device, progress=False)

    def evaluate(model: nn.Module) -> dict:
        return evaluate_fn(model, eval_dataset, eval_indices, **ev)

    kl = compute_kl_maps(fp_model, q_model, calib_dataset, indices=map_indices, bits=sweep.entropy_bits,
                         batch_size=sweep.batch_size, workers=workers, device=device, max_memory=max_memory,
                         progress=progress)
    maps = {"fp": kl.fp, "quant": kl.quant}
    entries = sum(m.numel() for m in kl.fp.entropy)
    deltas = attn_deltas(q_model) if qcfg.attn_quantizer != "uniform" else None
    vq = qcfg.attn_quantizer  # frozen values use the post-softmax quantizer (and its Δ), as EAM_4bits
    wa = f"{qcfg.w_bits}/{qcfg.a_bits}"

    base = {"fp": (fp_model, evaluate(fp_model), "32/32"), "repq": (q_model, evaluate(q_model), wa)}
    jobs = [(t, "eam", mp, vals, 0) for t in sweep.taus for mp in sweep.maps for vals in sweep.values]
    jobs += [(t, "random", "quant", "quant", s) for t in sweep.taus for s in sweep.random_seeds]
    results: dict[tuple, list[tuple[dict, FreezeReport]]] = {}
    bar = tqdm(jobs, desc="quant sweep", unit="point", disable=not progress, dynamic_ncols=True)
    try:
        for tau, method, mp, vals, seed in bar:
            bar.set_postfix(tau=tau, method=method, maps=mp, values=vals)
            cfg = FreezeConfig(tau=tau, scope=sweep.scope, selection="entropy" if method == "eam" else "random",
                               seed=seed, value_bits=fbits if vals == "quant" else None, value_quantizer=vq)
            report = freeze_(q_model, maps[mp], cfg, value_deltas=deltas if vals == "quant" else None)
            results.setdefault((tau, method, mp, vals), []).append((evaluate(q_model), report))
    finally:
        unfreeze_(q_model)

    rows: list[dict[str, Any]] = []
    for tau in sweep.taus:
        for name, (model, m, prec) in base.items():
            rows.append({"tau": tau, "method": name, "maps": None, "values": None, "precision": prec,
                         "top1": m["top1"], "top1_std": 0.0, "top5": m["top5"], "frozen_fraction": 0.0, "seeds": 1,
                         **size_report(model, attention_entries=entries)})
        for (t, method, mp, vals), res in results.items():
            if t != tau:
                continue
            top1s = [r[0]["top1"] for r in res]
            report = res[-1][1]
            vb = fbits if vals == "quant" else None
            rows.append({"tau": tau, "method": method, "maps": mp,
                         "values": f"{fbits}bit" if vals == "quant" else "fp32", "precision": wa,
                         "top1": round(statistics.fmean(top1s), 3),
                         "top1_std": round(statistics.pstdev(top1s), 3) if len(top1s) > 1 else 0.0,
                         "top5": round(statistics.fmean(r[0]["top5"] for r in res), 3),
                         "frozen_fraction": round(report.frozen_fraction, 6), "seeds": len(res),
                         **size_report(q_model, report, vb)})
    label = getattr(getattr(fp_model, "eam_spec", None), "name", type(fp_model).__name__)
    table = table1_markdown(rows, label, maps=sweep.table_maps,
                            values=f"{fbits}bit" if sweep.table_values == "quant" else "fp32")
    return {"rows": rows, "kl": kl, "table": table, "q_model": q_model}


def table1_markdown(rows: Sequence[dict], model_name: str, taus: Sequence[float] = (0.1, 0.2),
                    maps: str = "quant", values: str = "4bit") -> str:
    """The paper's Table 1 for one model: FP, RepQ-ViT and EAM at τ = 10 % and 20 % (top-1, %).

    Args:
        rows: rows of :func:`quant_sweep`.
        model_name: the column header.
        taus: the sparsity levels reported.
        maps: which maps the EAM rows use (``"quant"``: the paper's EAM_4bits).
        values: which frozen values (``"4bit"``-style label or ``"fp32"``).
    """
    def pick(method: str, tau: Optional[float] = None) -> Optional[dict]:
        for r in rows:
            if r["method"] != method:
                continue
            if method == "eam" and (r["maps"] != maps or r["values"] != values or not math.isclose(r["tau"], tau)):
                continue
            return r
        return None

    lines = [f"| Method | Prec. (W/A) | {model_name} |", "|---|---|---|"]
    for name, r in (("Full-Precision", pick("fp")), ("RepQ-ViT", pick("repq"))):
        if r is not None:
            lines.append(f"| {name} | {r['precision']} | {r['top1']:.2f} |")
    tag = values.replace("bit", "bits") if values != "fp32" else "32bits"
    for t in taus:
        r = pick("eam", t)
        if r is not None:
            lines.append(f"| EAM_{tag} (τ={round(100 * t)}%, maps from {'quantized' if maps == 'quant' else 'FP'} "
                         f"model) | {r['precision']} | {r['top1']:.2f} |")
    return "\n".join(lines) + "\n"


def size_table_markdown(rows: Sequence[dict]) -> str:
    """Size report per configuration (one line per method/maps/values at each τ)."""
    lines = ["| τ | method | maps | values | model bytes | frozen-map bytes | total bytes | entries skipped "
             "| q·k MACs skipped |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] in ("fp", "repq") and r["tau"] != rows[0]["tau"]:
            continue
        lines.append(f"| {r['tau']:.1f} | {r['method']} | {r['maps'] or ''} | {r['values'] or ''} "
                     f"| {r['model_bytes']} | {r['frozen_map_bytes']} | {r['total_bytes']} | {r['entries_skipped']} "
                     f"| {r['qk_macs_skipped']} |")
    return "\n".join(lines) + "\n"
