"""The demo's deployment steps: ``eamvit optimize`` on the digits model, and (``--full``) the export table."""
from __future__ import annotations

from eamvit.experiments.demo_run import DemoRun, Figure
from eamvit.experiments.results import markdown, write_table

EXPORT_REPS, EXPORT_REPS_FULL = 3, 7  # timed calls per row of the export table


def _export_step(demo: DemoRun) -> dict:
    """The model as a user would ship it: PyTorch and ONNX Runtime, fp32 and int8 (+ 4-bit weights with ``full``)."""
    from eamvit.experiments.export_table import EXPORT_COLUMNS, export_table
    from eamvit.methods.export_runtime import cpu_has_vnni

    rows = export_table(demo.model, reps=EXPORT_REPS_FULL if demo.full else EXPORT_REPS, short=not demo.full,
                        progress=True)
    write_table(demo.out / "export", rows, EXPORT_COLUMNS)
    table = markdown(rows, EXPORT_COLUMNS)
    note = ("\nThis CPU has no VNNI: ONNX Runtime's uint8 × int8 kernels add pairs of products in 16 bits and "
            "saturate, so the uint8-activation rows can score below the simulated model here; "
            "`eamvit export --symmetric-activations` avoids it.\n") if cpu_has_vnni() is False else ""
    against = ("against ONNX Runtime's own `quantize_static` (per-channel int8 weights, the same 32 calibration "
               "images) and with 4-bit weights only" if demo.full else
               "in fp32 and as eamvit's RepQ-ViT W8/A8 QDQ export (32 calibration images)")
    md = f"""## Deployable: ONNX Runtime on CPU

The same digits model exported by `eamvit export` and run in ONNX Runtime, {against}. images/s: median of
repeated timed calls over the 360 test digits (p25/p75: quartiles of the repetitions), on this
machine; file bytes: the `.onnx` file, or the packed quantized state for the simulated row.
{note}
{table}
"""
    return {"rows": rows, "table": table, "markdown": md}


OPTIMIZE_MINUTES = 0.5  # the demo's search budget: the small space, stopped after this long
# What the small space's quantization points are, per runtime, for the demo's text.
_QUANT_POINTS = {"onnxruntime": "int8 QDQ (asymmetric and symmetric activations)",
                 "openvino": "NNCF's int8 of the fp32 export (alone and after pruning or freezing) and RepQ-ViT int8 "
                             "for OpenVINO"}


def _optimize_step(demo: DemoRun) -> dict:
    """``eamvit optimize`` on the digits model: the fastest recipe within one point of top-1, in OpenVINO where it is
    installed, else in ONNX Runtime."""
    from eamvit.experiments.optimize import OptimizeConfig, optimize
    from eamvit.experiments.optimize_report import RUNTIME_NAMES, CommandLines, columns
    from eamvit.methods.data import build_splits
    from eamvit.methods.export_openvino import INSTALL, is_available
    from eamvit.methods.models import data_config

    # The one split rule, as `eamvit optimize --data digits` applies it: the report's commands rebuild the point.
    sp = build_splits("digits", data_config(demo.model), calibrate=True)
    runtime = "openvino" if is_available(nncf=True) else "onnxruntime"  # with NNCF
    name = RUNTIME_NAMES[runtime]
    # One thread: on a model this small a second thread adds more noise than speed.
    config = OptimizeConfig(max_drop=1.0, runtime=runtime, space="small", budget_minutes=OPTIMIZE_MINUTES, reps=10,
                            threads=1)
    out = demo.out / "optimize"
    res = optimize(demo.model, sp, out, config, CommandLines(data=["--data", "digits"]), device=demo.device)
    figure = Figure("plot_pareto", (res.rows, out / "pareto.png", config.max_drop),
                    {"title": f"digits ViT: eamvit optimize in {name}"})
    front = markdown([r for r in res.rows if r["on_front"]], columns(config.runtime))
    b = res.best
    chosen = ("no recipe within one point of top-1" if b is None else
              f"chosen: {b['label']}, top-1 {b['top1']:.2f}% in {name} (unmodified {res.rows[0]['top1']:.2f}%), "
              f"measured speed-up x{b['speedup']:.3f} (p25 {b['speedup_p25']:.3f}, p75 {b['speedup_p75']:.3f})")
    stopped = (f" The {OPTIMIZE_MINUTES:g}-minute budget stopped it with {res.progress.not_run} candidate(s) not run."
               if res.progress.stopped else "")
    where = ("OpenVINO is installed, so the search measures in OpenVINO (without it: ONNX Runtime)."
             if runtime == "openvino" else
             f"OpenVINO is not installed, so the search measures in ONNX Runtime; with `{INSTALL}` it measures in "
             "OpenVINO, with NNCF's int8 as a candidate.")
    md = f"""## The fastest recipe within one point of top-1 (`eamvit optimize`, {name})

`eamvit optimize --runtime {runtime} --space small --budget-minutes {OPTIMIZE_MINUTES:g} --threads 1` on the digits
model: {_QUANT_POINTS[runtime]}, EViT token pruning in the late blocks and head freezing, then the survivors stacked,
each exported and measured in {name} against the fp32 export in {name}. {where}{stopped}
{chosen}. The Pareto front:

{front}
![top-1 against measured speed-up](optimize/pareto.png)

`optimize/report.md` gives the commands that rebuild and check the chosen point; `optimize/pareto.*` lists every
point.
"""
    return {"rows": res.rows, "table": f"measured in {name}; {chosen}\n\n{front}", "markdown": md,
            "figures": [figure]}
