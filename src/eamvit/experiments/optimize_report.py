"""The results of ``eamvit optimize``: one row per point, the Pareto front, ``pareto.*`` and ``report.md``."""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from eamvit.methods.state import state_of
from eamvit.methods.prune import setting_text
from eamvit.experiments.optimize_space import Candidate, recipe_options
from eamvit.experiments.prune_sweep import merged_fields
from eamvit.experiments.results import Column, markdown, write_table
from eamvit.io import write_text
from eamvit.methods.evaluate import result_row
from eamvit.methods.merge import merge_, unmerge_
from eamvit.methods.export import ExportConfig
from eamvit.methods.export_openvino import read_model_meta
from eamvit.ops.pareto import front_mask

RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "torch": "PyTorch"}


@dataclass
class CommandLines:
    """The run's model options (``--model``, ``--checkpoint`` ...) and data options (``--data``, ``--seed`` ...)
    that the commands rebuilding its best point need."""

    model: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)


def describe_export(export: Optional[ExportConfig], quantized: bool, nncf: bool = False) -> str:
    """How a point's file is written: ``fp32``, ``qdq (uint8 act.)``, ``qdq (int8 act.)``, ``qdq for OpenVINO``,
    ``weight-only``, ``nncf`` (NNCF's int8 of the fp32 export); ``""`` for PyTorch."""
    if export is None:
        return ""
    if nncf:
        return "nncf (int8 OpenVINO IR)"
    if not quantized:
        return "fp32"
    if export.runtime == "openvino":
        return "qdq for OpenVINO (int8 act.)"
    if export.scheme == "weight-only":
        return "weight-only (MatMulNBits)"
    return "qdq (int8 act.)" if export.symmetric_activations else "qdq (uint8 act.)"


def _fields(cand: Candidate, model: nn.Module) -> dict[str, Any]:
    q, f, p, m = (cand.recipe.step(s) for s in ("quant", "freeze", "prune", "merge"))
    quant = ("nncf", 8, 8) if cand.nncf else (q.KIND, q.w_bits, q.a_bits) if q else (None, None, None)
    row: dict[str, Any] = {"quant": quant[0], "w_bits": quant[1], "a_bits": quant[2],
                           "export": describe_export(cand.export, q is not None, cand.nncf) or None,
                           "granularity": f.granularity if f else None, "tau": f.tau if f else None,
                           "prune": p.method if p else None, "keep_rate": setting_text(p.keep_rate) if p else None,
                           "blocks": "-".join(map(str, p.blocks)) if p and p.blocks else ("default" if p else None),
                           "merge": None, "merge_r": None,
                           "finetune_epochs": cand.finetune.epochs if cand.finetune is not None else None}
    if m is not None:  # what the merging does to this model: merge_r after the cap, its blocks, its tokens
        merge_(model, m)
        try:
            fields = merged_fields(model)
        finally:
            unmerge_(model)
        row.update({k: fields[k] for k in ("merge", "merge_r", "alpha", "blocks")})
    return row


def point_rows(done: Sequence[tuple[Candidate, dict[str, Any]]], config, model: nn.Module,
               data_config: Optional[dict] = None) -> list[dict[str, Any]]:
    """One results row per measured point of :func:`eamvit.experiments.optimize.search` (the reference first), with
    its Δ top-1, the budget, the front and the choice: the head of every eamvit row, then the point's fields.

    Args:
        config: the run's :class:`~eamvit.experiments.optimize.OptimizeConfig`.
        model: the unmodified model (name, parameter count).
    """
    ref_top1 = done[0][1]["top1"]
    runtime = RUNTIME_NAMES[config.runtime]
    rows = []
    for i, (cand, p) in enumerate(done):
        ok = "error" not in p
        row = result_row(model, p if ok else {}, data_config, label=cand.label, **_fields(cand, model), runtime=runtime,
                         stage="reference" if i == 0 else "single" if cand.techniques == 1 else "stack",
                         top1_delta=round(p["top1"] - ref_top1, 3) if ok else None,
                         speedup=p.get("speedup"), speedup_p25=p.get("speedup_p25"), speedup_p75=p.get("speedup_p75"),
                         file_bytes=p.get("file_bytes"), model_bytes=p.get("model_bytes"),
                         within_budget=ok and ref_top1 - p["top1"] <= config.max_drop + 1e-9, on_front=False,
                         chosen=False, error=p.get("error"))
        rows.append(row)
    measured = [r for r in rows if r["error"] is None]
    for r, on in zip(measured, front_mask([(r["top1"], r["speedup"]) for r in measured])):
        r["on_front"] = on
    ok = [r for r in measured[1:] if r["within_budget"]]
    if ok:  # the fastest by median; ties: the higher top-1, then the earlier point
        max(ok, key=lambda r: (r["speedup"], r["top1"], -rows.index(r)))["chosen"] = True
    size = "model_bytes" if config.runtime == "torch" else "file_bytes"
    drop = [k for k in ("file_bytes", "model_bytes", "error") if k != size
            and not (k == "error" and any(r["error"] for r in rows))]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def columns(runtime: str) -> list[Column]:
    """The markdown view of the rows (the CSV and JSON carry every field)."""
    size = Column("model_bytes", "bytes", ",") if runtime == "torch" else Column("file_bytes", "file bytes", ",")
    return [Column("label", "point"), Column("export", "export"), Column("top1", "top-1 (%)", ".2f"),
            Column("top1_delta", "Δ top-1", ".2f"), Column("speedup", "measured ×", ".3f"), Column("speedup_p25", "p25", ".3f"),
            Column("speedup_p75", "p75", ".3f"), size, Column("within_budget", "within"),
            Column("on_front", "front"), Column("chosen", "chosen")]


def write_pareto(out: Path, rows: Sequence[dict[str, Any]], runtime: str) -> dict[str, Path]:
    """``pareto.csv`` and ``pareto.json`` (every field) and ``pareto.md`` (:func:`columns`)."""
    files = write_table(out / "pareto", rows, formats=("csv", "json"))
    write_text(out / "pareto.md", markdown(rows, columns(runtime)))
    return {f"pareto.{k}": v for k, v in {**files, "md": out / "pareto.md"}.items()}


def commands_for(cand: Candidate, runtime: str, commands: CommandLines, out: Path) -> dict[str, str]:
    """The command lines that rebuild, export and evaluate the chosen point; an NNCF point's ``export`` line
    writes the fp32 file that NNCF quantizes (``best-fp32.onnx``), its ``eval_onnx`` scores the shipped file."""
    state = str(out / "best.safetensors")
    both = [*_model_args(cand, commands, out), *commands.data]
    lines = {"eval_state": ["eamvit", "eval", "--state", state, *both]}
    if cand.recipe.steps:
        lines["compress"] = ["eamvit", "compress", *both, *recipe_options(cand.recipe), "--out", state]
    if cand.export is not None:
        onnx = str(out / ("best-fp32.onnx" if cand.nncf else "best.onnx"))
        lines["export"] = ["eamvit", "export", "--state", state, *both, "--out", onnx]
        shipped = str(out / "best.xml") if cand.nncf else onnx
        lines["eval_onnx"] = ["eamvit", "eval", "--onnx", shipped, *commands.data]
        lines["eval_onnx"] += ["--runtime", "openvino"] if runtime == "openvino" else []
    return {k: shlex.join(v) for k, v in lines.items()}


def _model_args(cand: Candidate, commands: CommandLines, out: Path) -> list[str]:
    """The model options of the rebuilding commands: the run's, or for a fine-tuned point its weights
    (``best_weights.safetensors``) in place of the run's."""
    if cand.finetune is None:
        return commands.model
    args, it = [], iter(commands.model)
    for a in it:
        if a == "--checkpoint":
            next(it, None)
        elif a != "--pretrained":
            args.append(a)
    return args + ["--checkpoint", str(out / "best_weights.safetensors")]


def _finetune_note(cand: Candidate) -> str:
    ft = cand.finetune
    return (f"\n`best_weights.safetensors` holds the weights this point was built on: the unmodified model fine-tuned "
            f"by optimize for {ft.epochs} epochs (peak learning rate {ft.lr:g}, warm-up {ft.warmup_epochs:g} epochs, "
            f"`eamvit finetune`'s other defaults) with its {cand.reduction.KIND} step applied, on the training images. "
            "`best.safetensors` and the commands below name them.\n")


def _budget_line(prog, config) -> str:
    done = f"{prog.measured} point(s) measured now, {prog.reused} read from `points.jsonl`"
    if prog.stopped:
        return (f"The time budget ({config.budget_minutes:g} min) stopped the search with {prog.not_run} planned "
                f"candidate(s) not run, and no stacks built from them ({done}); run the same command again to resume.")
    return f"The search ran to the end ({done})."


def _nncf_note(best: dict[str, Any], cand: Candidate, out: Path) -> str:
    """What an NNCF point's two files are: the shipped IR, and the float model before NNCF."""
    n = read_model_meta(out / "best.xml")["quant"]["subset_size"]
    before = "the recipe's float steps" if cand.recipe.steps else "no step: the unmodified model"
    return (f"\n`best.xml` + `best.bin` is the shipped file: the point's fp32 export quantized to int8 by NNCF "
            f"(`nncf.quantize`, TRANSFORMER, the first {n} calibration images); the top-1 above is that file's "
            f"(`eval --onnx best.xml --runtime openvino`). `best.safetensors` holds the model before NNCF "
            f"({before}): `eamvit eval --state best.safetensors` scores that float model, {best['top1_torch']:.3f}%, "
            f"not the shipped file. To rebuild the file, export it in fp32 (below), then quantize it with "
            f"`eamvit.methods.export_openvino.nncf_quantize(best-fp32.onnx, best.xml, images)` on those {n} "
            "images.\n")


def _chosen_section(best: dict[str, Any], cand: Candidate, config, commands: CommandLines, out: Path) -> str:
    lines = commands_for(cand, config.runtime, commands, out)
    exported = config.runtime != "torch"
    file = "best.xml" if cand.nncf else "best.onnx"
    size = (f"{best['file_bytes']:,} bytes ({file}{' + best.bin' if cand.nncf else ''})" if exported
            else f"{best['model_bytes']:,} bytes at its bit widths")
    where = f"in {RUNTIME_NAMES[config.runtime]}" + (f" ({file})" if exported else "")
    note = _finetune_note(cand) if cand.finetune is not None else ""
    if cand.nncf:
        note += _nncf_note(best, cand, out)
    elif exported and best["top1_torch"] != best["top1"]:  # the same quantizers; only the runtime's arithmetic differs
        how = ("OpenVINO's int8 kernels (and its bf16 float layers, on CPUs with AVX-512 BF16)"
               if config.runtime == "openvino" else "ONNX Runtime's integer kernels")
        note += (f"\n`eamvit eval --state best.safetensors` (the same model in PyTorch) gives {best['top1_torch']:.3f}%: "
                f"{how} round differently on this CPU.\n")
    rebuild = "\n".join(lines[k] for k in ("compress", "export") if k in lines)
    check = "\n".join(lines[k] for k in ("eval_state", "eval_onnx") if k in lines)
    return f"""## Chosen: {best['label']}

- top-1 **{best['top1']:.3f}%** {where} on {best['num_images']} held-out images, {-best['top1_delta']:.2f} points below
  the reference
- measured speed-up **×{best['speedup']:.3f}** (quartiles ×{best['speedup_p25']:.3f} – ×{best['speedup_p75']:.3f})
- {size}
{note}
Rebuild it:

```
{rebuild}
```

Check it:

```
{check}
```
"""


def report_text(rows: Sequence[dict[str, Any]], best: Optional[dict[str, Any]], cand: Optional[Candidate], prog,
                config, commands: CommandLines, out: Path, model: nn.Module) -> str:
    """The text of ``report.md``: the setting, the chosen point and its commands, the front."""
    ref = rows[0]
    spec = state_of(model).spec
    onnx = config.runtime != "torch"
    runtime = {"onnxruntime": f"ONNX Runtime on CPU ({config.threads or 'default'} threads), each point's exported file",
               "openvino": f"OpenVINO on CPU ({config.threads or 'default'} threads, its default inference precision: "
                           "bf16 float layers on CPUs with AVX-512 BF16 or AMX, f32 elsewhere), each point's exported "
                           "file; an `nncf-int8` point's file is its fp32 export quantized by NNCF (`nncf.quantize`, "
                           "TRANSFORMER) into an OpenVINO IR",
               "torch": "PyTorch, each point's model (quantization is left out: PyTorch simulates it in float)"}
    runtime = runtime[config.runtime]
    if best is not None and cand is not None:
        chosen = _chosen_section(best, cand, config, commands, out)
    else:
        chosen = (f"## No recipe within {config.max_drop:g} point(s)\n\nNo measured point other than the unmodified "
                  "model keeps top-1 within the budget; best.safetensors and the best file are not written. Allow a "
                  "larger --max-drop, or let the search run to the end.\n")
    front = [r for r in rows if r["on_front"]]
    failed = [r for r in rows if r.get("error")]
    failed_md = "".join(f"- {r['label']}: {r['error']}\n" for r in failed)
    return f"""# eamvit optimize: the fastest recipe within {config.max_drop:g} point(s) of top-1

Model: `{getattr(spec, 'name', None) or type(model).__name__}`. Runtime: {runtime}. Top-1 on
the held-out images only (calibration images are never scored); the reference is the
unmodified model{"'s fp32 export" if onnx else ""}: top-1 **{ref['top1']:.2f}%**.
Speed-up: the median over {config.reps} repetitions of time(reference) / time(point), both timed on the same
{config.batch_size} held-out images in every repetition, in alternation; p25 / p75 are the quartiles. The
reference row, timed against itself, shows this machine's noise.

{chosen}
## Pareto front (top-1 against measured speed-up)

{markdown(front, columns(config.runtime))}
![top-1 against measured speed-up](pareto.png)

{_budget_line(prog, config)} Every point: `pareto.csv`, `pareto.json`, `pareto.md`.
{"Not applicable to this model:" + chr(10) + failed_md if failed else ""}"""
