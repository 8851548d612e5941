"""``eamvit demo``: the whole EAM pipeline on the bundled digits ViT, in about a minute on CPU (``--full`` adds the
slow parts). The steps: ``docs/architecture-experiments.md``, "demo".
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from eamvit.experiments.compare import DEMO_CONFIG, compare, markdown_table as compare_table
from eamvit.experiments.demo_deploy import OPTIMIZE_MINUTES, _export_step, _optimize_step
from eamvit.experiments.demo_run import DemoRun, Figure, Step, _say
from eamvit.experiments.digits import ASSET, DEMO_KWARGS, DEMO_MODEL, DigitsConfig, load_demo_model, train_digits
from eamvit.experiments.freeze_sweep import freeze_sweep
from eamvit.experiments.frozen_finetune import SHORT_RECIPE, frozen_finetune_table, markdown_table as finetune_table
from eamvit.experiments.prune_sweep import SWEEP_MERGES, figure_data, matched_merges, prune_table
from eamvit.experiments.quant_sweep import QuantSweepConfig, quant_sweep, size_table
from eamvit.experiments.results import ResultRow, format_sweep_table, markdown, retitle, write_table
from eamvit.experiments.runner import Timing
from eamvit.experiments.speed_sweep import SPEED_COLUMNS, plot_rows, speed_sweep, summary_lines
from eamvit.io import ensure_writable_dir, write_text
from eamvit.methods.calibrate import CalibOptions, compute_entropy_maps
from eamvit.methods.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset
from eamvit.methods.freeze import FreezeConfig
from eamvit.methods.models import data_config
from eamvit.methods.prune import method_config
from eamvit.methods.repq import RepQConfig
from eamvit.methods.train import train_dataset
from eamvit.ops.scores import default_blocks

TAUS = [round(0.1 * i, 1) for i in range(10)]
SCOPES = ("head", "global")  # the default demo sweeps the first; --full both
SEEDS = (0, 1, 2)
QUANT_TAUS = (0.0, 0.1, 0.2, 0.3, 0.5)  # the demo's quantized sweep: Table 1 needs 10 % and 20 %
KEEP_RATES = (0.7, 0.5)
SPEED_TAUS = (0.3, 0.5, 0.7, 0.9)  # the speed comparison: freezing levels ...
KEEP_RATES_SPEED = (0.9, 0.7, 0.5)  # ... and pruning keep rates
SPEED_METHODS = (("shannon", None), ("renyi", 2.0), ("evit", None))
SPEED_TIMING = Timing(batch_size=64, warmup=3, reps=15)  # a tiny model: larger batches, more repetitions
FINETUNE_TAUS = (0.5, 0.7, 0.9)


def run_demo(out: Path = Path("eamvit-demo"), retrain: bool = False, checkpoint: Optional[str] = None,
             device: torch.device | str = "cpu", epochs: int = 80, full: bool = False, *,
             draw: Callable[[Figure], None]) -> dict:
    """Run the demo; returns the numbers that went into the report.

    Args:
        retrain: train the digits ViT (``epochs`` epochs) instead of loading ``checkpoint`` (the bundled one by
            default).
        full: also run the slow steps (:data:`STEPS` entries marked ``full``).
        draw: draws each :class:`Figure` a step asks for, as soon as the step is done (the CLI's).
    """
    out = ensure_writable_dir(out)
    t0 = time.perf_counter()
    plan = [s for s in STEPS if full or not s.full]
    skipped = [] if full else [s for s in STEPS if s.full or s.more]
    n = len(plan) + 2  # + loading the model, + the report
    ckpt = _checkpoint(out, retrain, checkpoint, device, epochs, n)
    model = load_demo_model(ckpt, device=device)
    demo = DemoRun(out, ckpt, model, DigitsDataset("train", img_size=DEMO_KWARGS["img_size"]),
                   DigitsDataset("test", img_size=DEMO_KWARGS["img_size"]), device, full)
    demo.base = demo.eval_data.evaluate(model)
    print(f"unfrozen test top-1: {demo.base['top1']:.2f}% on {demo.base['num_images']} held-out digits", flush=True)
    for k, step in enumerate(plan, start=2):
        _say(f"[{k}/{n}] {step.title}" + (f" + {step.more}" if full and step.more else ""))
        started = time.perf_counter()
        section = step.run(demo)
        for figure in (section or {}).get("figures", ()):
            draw(figure)
        if section is not None:
            demo.sections[step.name] = section
            print(f"\n{section['table']}", flush=True)
        _say(f"      ({time.perf_counter() - started:.0f} s)")
        write_text(out / "report.md", report(demo, skipped, None))
    _say(f"[{n}/{n}] report")
    elapsed = time.perf_counter() - t0
    write_text(out / "report.md", report(demo, skipped, elapsed))
    print(f"\nwrote {out / 'report.md'} with figures and results in {out}/ ({elapsed:.0f} s)"
          + ("" if full else "; `eamvit demo --full` adds the parts the report lists as not run"))
    return {"base": demo.base, **{name: sec["rows"] for name, sec in demo.sections.items()}}


def _checkpoint(out: Path, retrain: bool, checkpoint: Optional[str], device, epochs: int, n: int) -> Path:
    """Step 1: the digits checkpoint (trained now with ``retrain``)."""
    if not retrain:
        ckpt = Path(checkpoint) if checkpoint else ASSET
        _say(f"[1/{n}] loading the digits ViT from {ckpt}")
        return ckpt
    ckpt = out / "digits_vit.safetensors"
    _say(f"[1/{n}] training the digits ViT ({epochs} epochs) -> {ckpt}")
    train_digits(ckpt, DigitsConfig(epochs=epochs), device=device)
    return ckpt


def _maps_step(demo: DemoRun) -> None:
    """Entropy maps on the training split (maps.safetensors)."""
    demo.maps = compute_entropy_maps(demo.model, demo.train, bits=8, batch_size=128,
                                     options=CalibOptions(device=demo.device, meta={"data": "digits/train", "seed": 0}))
    demo.maps.save(demo.out / "maps.safetensors")


def _figures_step(demo: DemoRun) -> dict:
    """The paper's figures of the maps."""
    maps, out = demo.maps, demo.out
    last = maps.num_layers - 1
    figures = [Figure("plot_cls_entropy", (maps, l, out / f"cls_entropy_L{l}.png"))  # every layer, one colour scale
               for l in range(maps.num_layers)]
    figures += [Figure("plot_full_entropy", (maps, [(0, 0), (1, 2), (last, 0)], out / "full_entropy.png")),
                Figure("plot_head_summary", (maps, out / "head_entropy.png"))]
    files = (f"cls_entropy_L0.png ... cls_entropy_L{last}.png, full_entropy.png, head_entropy.png")
    md = f"""## Figures

- `cls_entropy_L0.png` ... `cls_entropy_L{last}.png`: entropy of the CLS token's attention to every patch, per
  head, one file per layer on one colour scale (Fig. 2 of the EAM paper, *Exploiting Information Redundancy
  in Attention Maps for Extreme Quantization of Vision Transformers*); layers and heads are numbered from 0
- `full_entropy.png`: full entropy maps of chosen (layer, head) pairs on the same colour scale (its Fig. 3)
- `head_entropy.png`: mean entropy per layer and head
"""
    return {"rows": [], "table": f"figures: {files}", "markdown": md, "figures": figures}


def _sweep_step(demo: DemoRun) -> dict:
    """Entropy against random freezing over τ, per scope (sweep.csv/json/md, sweep.png)."""
    rows: list[ResultRow] = []
    for scope in SCOPES if demo.full else SCOPES[:1]:
        rows += freeze_sweep(demo.model, demo.maps, demo.eval_data, TAUS, FreezeConfig(scope=scope), seeds=SEEDS, label="fp32")
    write_table(demo.out / "sweep", rows)
    figure = Figure("plot_sweep", (rows, demo.out / "sweep.png"), {"title": "digits ViT: entropy vs random freezing",
                                                                   "reference": {"unfrozen": demo.base["top1"]}})
    table = format_sweep_table(rows)
    md = f"""## Top-1 (%) against sparsity τ (fraction of attention entries frozen to their mean)

Entropy freezing is deterministic; random freezing is the mean over {len(SEEDS)} seeds, with their
standard deviation in the `±` column beside it.
`head` freezes τ of every (layer, head){", `global` τ of all entries of the model" if demo.full else ""}.

{table}
![sweep](sweep.png)
"""
    return {"rows": rows, "table": table, "markdown": md, "figures": [figure]}


def report(demo: DemoRun, skipped: list[Step], elapsed: Optional[float]) -> str:
    """The text of ``report.md``: the sections so far, what ``--full`` would add (``skipped``), the files.

    Args:
        elapsed: the run time, or ``None`` while the demo is still running (the report says so, and
            keeps saying so if a later step fails).
    """
    base = demo.base
    parts = "\n".join(sec["markdown"] for sec in demo.sections.values())
    state = (f"Run time: {elapsed:.0f} s." if elapsed is not None else
             "**Incomplete**: the demo was still running when this was written (it stopped here if it "
             "failed).")
    full = "".join(f"- {s.more or s.title}\n" for s in skipped)
    full = f"""## Not run here: `eamvit demo --full` adds them

{full}""" if skipped else ""
    stems = [name for name, sec in demo.sections.items() if sec["rows"]]
    return f"""# eamvit demo: Entropy Attention Maps on the digits ViT

Model: timm `{DEMO_MODEL}` with `{DEMO_KWARGS}`, weights `{demo.ckpt.name}`.
Data: scikit-learn digits, 8x8 upsampled to 16x16; {len(demo.train)} training digits calibrate the maps,
{base['num_images']} held-out digits measure top-1. Histograms: 2^8 bins on [0, 1].

Unfrozen test top-1: **{base['top1']:.2f}%** (top-5 {base['top5']:.2f}%).

{parts}
{full}
Files: `maps.safetensors` (the maps); every table's rows with all their fields as CSV, JSON and
markdown: {', '.join(f"`{stem}.*`" for stem in stems) or 'none yet'}.
{state}
"""


def _speed_step(demo: DemoRun) -> dict:
    """Freezing by entry, row and head against token pruning and merging, at measured speed (speed_sweep.*)."""
    model, maps, out = demo.model, demo.maps, demo.out
    freeze = [FreezeConfig(tau=t, granularity=g) for g in ("entry", "row", "head") for t in SPEED_TAUS]
    prune = [method_config(m, a, k) for m, a in SPEED_METHODS for k in KEEP_RATES_SPEED]
    rows = speed_sweep(model, maps, demo.eval_data, freeze, prune,
                       matched_merges(model, KEEP_RATES_SPEED, SWEEP_MERGES, {}), SPEED_TIMING)
    write_table(out / "speed_sweep", rows, formats=("csv", "json"))
    table = markdown(rows, SPEED_COLUMNS)
    write_text(out / "speed_sweep.md", table)
    figure = Figure("plot_top1_vs_speedup", (plot_rows(rows), out / "speed_sweep.png"),
                    {"title": "digits ViT: frozen attention vs token pruning and merging at measured speed"})
    verdict = "\n".join(f"- {line}" for line in summary_lines(rows))
    md = f"""## Which makes the model really faster: frozen attention, token pruning or token merging?

Frozen heads skip their q/k projections, scores and softmax; frozen rows skip their query
projection, scores and softmax; frozen entries (the paper's granularity) skip nothing, because a
row's softmax needs all its scores. `GMACs/image` is what the cost model counts as executed, `predicted ×`
the ratio of MACs. `measured ×` times the point and an unmodified copy in alternation,
{SPEED_TIMING.reps} forwards of {SPEED_TIMING.batch_size} random images each, and gives the median of the per-forward ratios
(p25/p75: quartiles), on this machine during the demo; `images/s` is the unmodified copy's throughput
over the sweep times that ×, so the two columns agree. At 0.015 GMACs per image this model is
small enough for per-operation overhead to weigh heavily: the unmodified row, timed against its
own copy, shows the noise floor. Freezing picks the lowest-entropy units (entries per head, rows
and heads per layer); pruning and merging (at the `r` matching each κ's GMACs) are off the shelf.

{table}
{verdict}

![top-1 against measured speed-up](speed_sweep.png)
"""
    return {"rows": rows, "table": table + "\n" + verdict + "\n", "markdown": md, "figures": [figure]}


def _frozen_finetune_step(demo: DemoRun) -> dict:
    """Fine-tuning with frozen attention (the paper's future work): entropy vs random, before and after."""
    model, maps, out = demo.model, demo.maps, demo.out
    train = train_dataset("digits", data_config(model), augment="shift")
    rows = frozen_finetune_table(model, train, demo.eval_data, maps, taus=FINETUNE_TAUS, progress=True)
    write_table(out / "frozen_finetune", rows)
    table = finetune_table(rows)
    c = SHORT_RECIPE
    md = f"""## Fine-tuning with frozen attention (entry level, the paper's future work)

Each row freezes a copy of the model (entropy: the τ lowest-entropy entries of every head; random:
as many random ones, seed 0), measures it, fine-tunes it with the frozen entries held at A^μ and
gradients through everything else ({c.epochs} epochs of AdamW over the {len(train)} training digits with
random shifts, lr {c.lr:g} → {c.min_lr:g}, batch {c.batch_size}), and measures it again.
`eamvit finetune --tau T --granularity G` does the same from the command line and saves weights and
frozen maps that `eamvit eval --frozen` reloads.

{table}
"""
    return {"rows": rows, "table": table, "markdown": md}


def _quant_step(demo: DemoRun) -> dict:
    """RepQ-ViT W4/A4 with EAM on top: Table 1 at τ = 10 % / 20 %, Fig. 5, KL maps (Fig. 4), sizes."""
    model, train, out = demo.model, demo.train, demo.out
    res = quant_sweep(model, demo.eval_data, train, RepQConfig(w_bits=4, a_bits=4),
                      QuantSweepConfig(taus=QUANT_TAUS, random_seeds=(0,)))
    rows = res["rows"]
    write_table(out / "quant_sweep", rows)
    figures = [Figure("plot_quant_sweep", (rows, out / "quant_sweep.png"),
                      {"title": "digits ViT, W4/A4 RepQ-ViT + EAM"}),
               Figure("plot_kl_per_head", (res["kl"], out / "kl_per_head.png"),
                      {"title": "D_KL(p_fp32 ‖ p_W4A4) per head"}),
               Figure("plot_kl_cls", (res["kl"], 0, out / "kl_cls_L0.png"))]
    sizes = markdown(*size_table([r for r in rows if r["tau"] in (0.0, 0.2)]))
    table = markdown(res["table1"][0], retitle(res["table1"][1], top1="digits ViT"))
    md = f"""## W4/A4 post-training quantization (RepQ-ViT) with EAM on top

Table 1 of the paper on the digits ViT (top-1 %, held-out digits). EAM here uses maps computed on the
quantized model and frozen values quantized to 4 bits with the post-softmax log√2 quantizer (the
paper's EAM_4bits). Every variant, at every τ, is in `quant_sweep.csv`.

{table}
![quantized sweep](quant_sweep.png)

KL divergence between the FP and W4/A4 attention histograms: `kl_per_head.png` (the EAM paper's
Fig. 4a), `kl_cls_L0.png` (its Fig. 4b-c; layers and heads numbered from 0).

Sizes at τ = 0 and 20 %:

{sizes}
"""
    return {"rows": rows, "table": table, "markdown": md, "figures": figures}


def _prune_step(demo: DemoRun) -> dict:
    """Attention-entropy token pruning (Shannon, Rényi α = 2) against EViT and random, off the shelf."""
    model, train, test, out, device = demo.model, demo.train, demo.test, demo.out, demo.device
    rows, table = prune_table(model, train, test, keep_rates=KEEP_RATES, device=device, data_config=demo.data_config,
                              merges=SWEEP_MERGES)
    write_table(out / "prune", rows)
    images = torch.stack([test[i][0] for i in range(64)]).to(device)
    configs = [method_config(m, a, KEEP_RATES[0]) for m, a in (("shannon", None), ("renyi", 2.0), ("evit", None))]
    masks, entropies = figure_data(model, images, configs)
    figures = [Figure("plot_top1_vs_gmacs", (rows, out / "prune.png"),
                      {"title": "digits ViT: token pruning and merging at equal GMACs, off the shelf"}),
               Figure("plot_kept_patches", (images[0], masks, out / "kept_patches.png"),
                      {"mean": [DIGITS_MEAN], "std": [DIGITS_STD], "blocks": default_blocks(len(model.blocks)),
                       "title": f"patches kept at each stage, κ = {KEEP_RATES[0]}"}),
               Figure("plot_entropy_histograms", (entropies, out / "token_entropy.png"),
                      {"title": "patch-token attention entropy per block"})]
    md = f"""## Patch-token pruning by attention entropy, and token merging, off the shelf (no fine-tuning)

Pruning at blocks {', '.join(str(b) for b in default_blocks(len(model.blocks)))} of 0..{len(model.blocks) - 1}
(numbered from 0 as `--prune-blocks`; EViT's 3, 6, 9 of 0..11, scaled to this depth), keeping ⌈κ·(N−1)⌉ patch tokens per stage; images/s: median of 10 timed forwards of 64 images on
this machine during the demo (`prune.csv` has the interquartile range).
Merging (ToMe: bipartite soft matching with proportional attention; entropy merging: the
highest-entropy patch tokens merge into their most similar ones) runs in every block, `r` tokens per
block, with the `r` whose executed GMACs come closest to Shannon pruning's at each κ (`eamvit sweep
--prune` does the same).

{table}
![top-1 against GMACs](prune.png)

`kept_patches.png`: the patches each method keeps at every stage, over one test digit (Fig. 4 of
*Rényi Attention Entropy for Patch Pruning*);
`token_entropy.png`: per block, the distribution of patch tokens' attention entropy for α = 1, 2, 3, ∞
(its Fig. 5).
"""
    return {"rows": rows, "table": table, "markdown": md, "figures": figures}


def _compare_step(demo: DemoRun) -> dict:
    """FP vs RepQ-ViT vs ADFQ-ViT vs PMQ on the digits ViT, with the demo's fast settings."""
    ckpt, train, test, out, device = demo.ckpt, demo.train, demo.test, demo.out, demo.device
    rows = compare(lambda: load_demo_model(ckpt, device=device), train, test, replace(DEMO_CONFIG, progress=True),
                   device=device, data_config=demo.data_config)
    table = compare_table(rows)
    write_table(out / "compare", rows)
    md = f"""## Three PTQ methods on the same model and data

ADFQ-ViT runs here with the demo's fast settings (20 reconstruction iterations per module, 64
calibration images; the paper uses 3000 and 1024), so its row shows the pipeline, not the paper's
quality. `eamvit compare` runs the full settings.

{table}
"""
    return {"rows": rows, "table": table, "markdown": md}


# The demo's steps after loading the model, in order; `full` ones run only with `eamvit demo --full`.
STEPS = (
    Step("maps", "entropy attention maps on the training digits (b=8)", _maps_step),
    Step("figures", "figures", _figures_step),
    Step("sweep", f"sweep tau x {{entropy, random x{len(SEEDS)} seeds}}, scope {SCOPES[0]}", _sweep_step,
         more=f"the same sweep at scope {', '.join(SCOPES[1:])}"),
    Step("speed_sweep", "freezing (entry, row, head) vs token pruning and merging at measured speed", _speed_step,
         full=True),
    Step("frozen_finetune", f"fine-tuning with frozen attention, tau in {FINETUNE_TAUS}: entropy vs random",
         _frozen_finetune_step, full=True),
    Step("quant_sweep", f"RepQ-ViT W4/A4 + EAM at tau {', '.join(map(str, QUANT_TAUS))} (maps from FP and quantized "
         "model, fp32 and 4-bit frozen values, random freezing)", _quant_step),
    Step("prune", f"token pruning at keep rates {KEEP_RATES}: Shannon, Renyi a=2, EViT, random; ToMe and entropy "
         "merging at their GMACs", _prune_step),
    Step("compare", "FP vs RepQ-ViT vs ADFQ-ViT vs PMQ at W4/A4 and W6/A6", _compare_step, full=True),
    # Full only: the optimize step measures fp32 against int8 in ONNX Runtime already, in alternation.
    Step("export", "ONNX export table: fp32, eamvit W8/A8 (QDQ) and W4 weight-only, ONNX Runtime's own "
         "quantize_static W8/A8, in PyTorch and ONNX Runtime", _export_step, full=True),
    Step("optimize", f"eamvit optimize: the fastest recipe within 1 point of top-1 ({OPTIMIZE_MINUTES:g} min, "
         "small space, in OpenVINO where installed, else ONNX Runtime)", _optimize_step),
)
