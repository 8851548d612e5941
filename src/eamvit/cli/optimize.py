"""``eamvit optimize``: the fastest recipe within a top-1 budget (the search is :mod:`eamvit.experiments.optimize`)."""
from __future__ import annotations

import argparse

from eamvit.errors import EamError
from eamvit.io import check_output_dir, output_lock
from eamvit.cli.common import data_splits, is_main, load_model, require_modules
from eamvit.cli.options import DATA_DEFAULTS, add_data_args, add_model_args, given_values, refuse_given

# The options a rebuilding command needs: the model's, and the data's (calibration and preprocessing).
_MODEL_DESTS = ("model", "model_kwargs", "pretrained", "checkpoint")
_DATA_DESTS = ("data", "calib_data", "calib_size", "seed", "num_samples", "img_size", "crop_pct", "crop_mode", "mean",
               "std", "interpolation")


def prune_recipes(paths) -> tuple:
    """The pruning configs of ``--prune-recipe`` files: each a recipe of one pruning step (as
    ``sweep --prune --per-block`` writes)."""
    from eamvit.methods.recipe import read_recipe

    out = []
    for path in paths:
        recipe = read_recipe(path)
        if len(recipe.steps) != 1 or recipe.step("prune") is None:
            kinds = ", ".join(s.KIND for s in recipe.steps) or "no step"
            raise EamError(f"--prune-recipe {path} holds {kinds}; give a recipe of one pruning step, such as "
                           "sweep --prune --per-block's per_block_recipe.json")
        out.append(recipe.step("prune"))
    return tuple(out)


def given_argv(args: argparse.Namespace, dests) -> list[str]:
    """The options among ``dests`` that the command line gave, written out again as arguments (``--data``
    and ``--seed`` where they are not their defaults, which the rebuilding commands take alike)."""
    out: list[str] = []
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and DATA_DEFAULTS.get(dest, ...) != value:  # a flag's value is True
            values = [] if value is True else value if isinstance(value, (list, tuple)) else [value]
            out += ["--" + dest.replace("_", "-"), *map(str, values)]
    return out


_FINETUNE_DESTS = ("finetune_lr", "finetune_warmup_epochs")


def finetune_config(args: argparse.Namespace):
    """The :class:`~eamvit.methods.finetune.FinetuneConfig` of ``--finetune-*`` (``None`` without
    ``--finetune-epochs``): ``eamvit finetune``'s defaults for the rest."""
    from eamvit.methods.finetune import FinetuneConfig

    if args.finetune_epochs < 0:
        raise EamError(f"--finetune-epochs must be 0 (no fine-tuning) or more, got {args.finetune_epochs}")
    if not args.finetune_epochs:
        refuse_given(args, _FINETUNE_DESTS, "without --finetune-epochs (nothing is fine-tuned)")
        return None
    return FinetuneConfig(epochs=args.finetune_epochs, **given_values(
        lr=args.finetune_lr, warmup_epochs=args.finetune_warmup_epochs, seed=args.seed))


def train_source(args: argparse.Namespace) -> str:
    """Where ``--finetune-epochs`` trains: the calibration source (``--calib-data``, or the digits' training
    split), never the images ``--data`` scores."""
    source = args.calib_data or ("digits" if args.data == "digits" else None)
    if source is None:
        raise EamError("--finetune-epochs trains on --calib-data, which is not given; give a folder of training "
                       "images there (optimize never trains on the images --data scores)")
    return source


def cmd_optimize(args: argparse.Namespace) -> None:
    from eamvit.experiments.optimize import CACHE, OptimizeConfig, optimize
    from eamvit.experiments.optimize_report import CommandLines
    from eamvit.methods.train import train_dataset
    from eamvit.plots.optimize import plot_pareto

    if args.runtime == "torch":
        refuse_given(args, ["threads"], "to --runtime torch (they are ONNX Runtime's and OpenVINO's)")
    config = OptimizeConfig(max_drop=args.max_drop, runtime=args.runtime, budget_minutes=args.budget_minutes,
                            space=args.space, threads=args.threads, reps=args.reps, batch_size=args.batch_size,
                            workers=args.workers, seed=args.seed, prunes=prune_recipes(args.prune_recipe or ()),
                            finetune=finetune_config(args))
    if config.runtime != "torch":  # OpenVINO reads eamvit's ONNX exports too
        require_modules(f"eamvit optimize --runtime {config.runtime}")
    if config.runtime == "openvino":
        from eamvit.methods.export_openvino import require_openvino

        require_openvino("eamvit optimize --runtime openvino", nncf=True)
    source = train_source(args) if config.finetune is not None else None
    out = check_output_dir(args.out)
    with output_lock(out / CACHE):  # two runs appending to one cache would mix their points
        model, device = load_model(args)
        sp = data_splits(args, model, need_calib=True)
        commands = CommandLines(model=given_argv(args, _MODEL_DESTS), data=given_argv(args, _DATA_DESTS))
        # Augmented as `eamvit finetune` trains.
        train = train_dataset(source, sp.data_config, strict_images=args.strict_images) if source else None
        res = optimize(model, sp, out, config, commands, device=device, progress=is_main(), train_set=train)
        plot_pareto(res.rows, out / "pareto.png", config.max_drop, title=f"eamvit optimize ({config.runtime})")
    if res.best is None:
        raise EamError(f"no recipe keeps top-1 within --max-drop {config.max_drop:g} of the unmodified "
                       f"{res.rows[0]['top1']:.2f}% ({len(res.rows) - 1} measured); {out}/pareto.* and report.md "
                       "list every point, best.safetensors and the best file are not written: allow a larger --max-drop"
                       + (" or a longer --budget-minutes" if res.progress.stopped else ""))
    b = res.best
    print(f"chosen: {b['label']}: top-1 {b['top1']:.2f}% (Δ {b['top1_delta']:+.2f}), measured speed-up "
          f"x{b['speedup']:.3f} (p25 {b['speedup_p25']:.3f}, p75 {b['speedup_p75']:.3f}); wrote "
          f"{', '.join(str(p) for p in res.files.values())}, {out / 'pareto.png'}")


def register(sub) -> None:
    """Add ``optimize`` to the ``eamvit`` parser."""
    s = sub.add_parser("optimize", help="search quantization, token pruning or merging, and freezing (alone and "
                       "stacked) for the fastest recipe within a top-1 budget, measured on this machine")
    add_model_args(s)
    add_data_args(s)
    g = s.add_argument_group("search")
    g.add_argument("--max-drop", type=float, default=1.0,
                   help="largest top-1 drop allowed, in points below the unmodified model on the held-out images")
    g.add_argument("--runtime", default="onnxruntime", help="where each point is measured: onnxruntime (its "
                   "export, CPU), openvino (its export in OpenVINO, CPU; int8 points: NNCF's int8 of the fp32 export "
                   "and RepQ-ViT int8 for OpenVINO: pip install \"eamvit[openvino]\") or torch (the PyTorch model, "
                   "no quantization: PyTorch only simulates it)")
    g.add_argument("--budget-minutes", type=float, default=None, help="start no new point after this many minutes, "
                   "write what was measured; a rerun resumes (default: no limit)")
    g.add_argument("--space", default="standard", help="standard (int8 QDQ asymmetric and symmetric, W4 weight-only, "
                   "Shannon and EViT pruning at κ 0.9/0.7/0.5 in the default and the late blocks, ToMe and entropy "
                   "merging in every and the late blocks at pruning's GMACs, head and row freezing at τ 0.25/0.5) or "
                   "small (int8 QDQ, EViT at κ 0.7/0.5 in the late blocks, head freezing at τ 0.25), then the "
                   "survivors stacked with one token reducer each; --runtime openvino: NNCF and RepQ-ViT int8")
    g.add_argument("--prune-recipe", action="append", default=None, metavar="FILE", help="also search the pruning "
                   "of this one-step recipe (e.g. `sweep --prune --per-block`'s per_block_recipe.json), alone and "
                   "stacked; repeat for several (default: the space's points only)")
    f = s.add_argument_group("fine-tuning (off by default: every point is post-training)")
    f.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune each pruning or merging point that "
                   "misses --max-drop for this many epochs (its reduction applied, on --calib-data or the digits' "
                   "training split, augmented) and search it again as `+ft`, alone and stacked; its speed does "
                   "not change, its top-1 may (default: 0, no fine-tuning)")
    f.add_argument("--finetune-lr", type=float, default=None,
                   help="peak AdamW learning rate of that fine-tuning (default: eamvit finetune's, 2e-05)")
    f.add_argument("--finetune-warmup-epochs", type=float, default=None,
                   help="epochs of linear learning-rate warm-up first (default: 0.0)")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime or OpenVINO threads (default: one a core)")
    g.add_argument("--reps", type=int, default=15, help="timed repetitions per point, each timing the point and "
                   "the unmodified model on --batch-size held-out images")
    g.add_argument("--out", required=True, help="output folder: pareto.csv/json/md/png, best.safetensors, best.onnx "
                   "(or NNCF's best.xml/.bin), report.md, and points.jsonl (measured points, reused by a rerun)")
    s.set_defaults(func=cmd_optimize)
