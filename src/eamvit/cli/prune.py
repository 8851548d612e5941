"""``sweep --prune`` (token pruning and merging) and ``finetune`` (of pruned, merged and/or frozen models)."""
from __future__ import annotations

from pathlib import Path

from eamvit.choices import AUGMENTS, IMAGENET_MIN_SIZE
from eamvit.errors import EamError
from eamvit.io import check_output_dir, ensure_writable_dir, write_text
from eamvit.cli.common import (data_overrides, data_splits, eval_data, flush_warnings, get_maps, is_main, load_maps,
                               load_model, warn_class_mismatch)
from eamvit.cli.options import (PRUNE_OPTIONS, SWEEP_KEEP_RATES, SWEEP_METHODS, add_data_args, add_entropy_args,
                                add_freeze_args, add_merge_args, add_model_args, add_prune_args, freeze_config,
                                given_values, merge_config, prune_config, prune_options, refuse_given,
                                refuse_merge_args, set_help)


def sweep_methods(args, methods: str, keep_rates: list[float]) -> tuple[list, list]:
    """``--methods`` (default ``methods``) as (pruning, merging) methods, each pruning one checked at every
    ``--keep-rates`` (default ``keep_rates``, set on ``args``) before anything is loaded."""
    from eamvit.experiments.prune_sweep import parse_sweep_methods
    from eamvit.methods.prune import check_keep_rate, method_config

    prunes, merges = parse_sweep_methods(args.methods or methods)
    args.keep_rates = args.keep_rates or keep_rates
    for k in args.keep_rates:
        check_keep_rate(k)
        for m, a in prunes:
            method_config(m, a, k, **prune_options(args))
    return prunes, merges


def cmd_prune_sweep(args) -> None:
    """``sweep --prune``: pruning per (method, κ), and merging at each κ's GMACs (``--methods``)."""
    from eamvit.experiments.prune_sweep import markdown_table, prune_sweep
    from eamvit.experiments.results import write_table
    from eamvit.experiments.runner import Timing
    from eamvit.modules.attention import attention_layers, require
    from eamvit.plots.prune import plot_top1_vs_gmacs

    if args.per_block:
        return cmd_per_block_sweep(args)
    methods, merges = sweep_methods(args, SWEEP_METHODS, SWEEP_KEEP_RATES)
    out = ensure_writable_dir(args.out)
    model, device = load_model(args)
    if merges:
        require(attention_layers(model), "merge")
    sp = data_splits(args, model, need_calib=False)
    flush_warnings()  # before the sweep, not after its results
    data = eval_data(args, sp, device)
    timing = None if args.no_throughput else Timing(warmup=1, **given_values(batch_size=args.throughput_batch,
                                                                             reps=args.throughput_reps))
    rows = prune_sweep(model, data, args.keep_rates, methods, timing, progress=is_main(), merges=merges,
                       **prune_options(args))
    if is_main():
        md = markdown_table(rows)
        files = write_table(out / "prune_sweep", rows, formats=("csv", "json"))
        write_text(out / "prune_sweep.md", md)
        what = "token pruning and merging at equal GMACs" if merges else "token pruning"
        plot_top1_vs_gmacs(rows, out / "prune_sweep.png", title=f"{rows[0]['model']}: {what}")
        if methods:  # the kept patches and the entropy histograms are pruning's figures
            _prune_figures(model, sp, methods, args, out)
        print(md)
        print(f"wrote {files['csv']}, {files['json']}, {out / 'prune_sweep.md'}, {out / 'prune_sweep.png'}")


PER_BLOCK_OPTIONS = ("per_block", "budget_keep_rate")
PER_BLOCK_METHODS = "renyi:1,renyi:2,renyi:inf"
BUDGET_KEEP_RATE = 0.7
RECIPE_FILE = "per_block_recipe.json"


def add_per_block_args(p) -> None:
    """``sweep --prune --per-block``: a keep rate and a Rényi order per pruning block."""
    g = p.add_argument_group("per-block token pruning (sweep --prune --per-block)")
    g.add_argument("--per-block", action="store_true", default=None, help="with --prune: choose a keep rate and a "
                   "Rényi order per pruning block by a greedy search on the calibration images within the GMACs of "
                   "--budget-keep-rate (docs/design.md); --keep-rates: each block's grid, 1 added (default "
                   f"{','.join(map(str, SWEEP_KEEP_RATES))}), --methods: one method or Rényi orders (default: "
                   f"{PER_BLOCK_METHODS}); writes OUT/per_block.* and OUT/{RECIPE_FILE}, a recipe of the choice")
    g.add_argument("--budget-keep-rate", type=float, default=None, help="--per-block's GMACs budget: those of this "
                   f"keep rate in every pruning block (default: {BUDGET_KEEP_RATE})")


def check_per_block(args) -> None:
    """Refuse the per-block options where they cannot apply (before anything is loaded)."""
    if not getattr(args, "prune", False):
        refuse_given(args, PER_BLOCK_OPTIONS, "without --prune (the per-block search is a pruning sweep)")
    elif not args.per_block:
        refuse_given(args, PER_BLOCK_OPTIONS[1:], "without --per-block")


def per_block_config(args):
    """The :class:`~eamvit.experiments.per_block_sweep.PerBlockSweepConfig` of the options."""
    from eamvit.experiments.per_block_sweep import PerBlockSweepConfig
    from eamvit.experiments.prune_sweep import parse_sweep_methods
    from eamvit.methods.prune import method_config

    refuse_given(args, ("no_throughput", "throughput_batch", "throughput_reps"), "to --per-block (it times nothing)")
    methods, merges = parse_sweep_methods(args.methods or PER_BLOCK_METHODS)
    if merges:
        raise EamError("--per-block searches token pruning; drop the merging methods from --methods")
    names = {m for m, _ in methods}
    if len(methods) > 1 and names != {"renyi"}:
        raise EamError(f"--per-block searches one method (or Rényi orders, renyi:1,renyi:2,...), not {args.methods}")
    alphas = tuple(a for _, a in methods) if names == {"renyi"} else ()
    budget = BUDGET_KEEP_RATE if args.budget_keep_rate is None else args.budget_keep_rate
    base = method_config(methods[0][0], alphas[0] if alphas else None, budget, **prune_options(args))
    return PerBlockSweepConfig(prune=base, keep_rates=tuple(args.keep_rates or SWEEP_KEEP_RATES), alphas=alphas)


def cmd_per_block_sweep(args) -> None:
    """``sweep --prune --per-block``: the greedy per-block search, its rows and the chosen recipe."""
    from eamvit.experiments.per_block_sweep import SEARCH_COLUMNS, per_block_sweep
    from eamvit.experiments.results import markdown, write_table
    from eamvit.methods.prune import setting_text
    from eamvit.methods.recipe import Recipe

    sweep = per_block_config(args)
    check_output_dir(args.out)
    model, device = load_model(args)
    sp = data_splits(args, model, need_calib=True)
    flush_warnings()  # before the search, not after its results
    res = per_block_sweep(model, eval_data(args, sp, device, calib=True), sweep, eval_data(args, sp, device),
                          progress=is_main())
    if is_main():
        out = ensure_writable_dir(args.out)
        md = markdown(res.rows, SEARCH_COLUMNS)
        files = write_table(out / "per_block", res.rows, formats=("csv", "json"))
        write_text(out / "per_block.md", md)
        write_text(out / RECIPE_FILE, Recipe(steps=(res.config,)).to_json() + "\n")
        print(md)
        print(f"chosen: {res.config.label}, κ {setting_text(res.config.keep_rate)} (budget {res.budget_gmacs} GMACs: "
              f"κ {setting_text(res.uniform.keep_rate)} in every pruning block)")
        print(f"wrote {files['csv']}, {files['json']}, {out / 'per_block.md'}, {out / RECIPE_FILE} (use it with "
              f"eval/export/compress --recipe, or optimize --prune-recipe)")


def _prune_figures(model, sp, methods, args, out: Path) -> None:
    """The seed's Fig. 4 (kept patches of the first image) and Fig. 5 (token entropy histograms)."""
    import torch

    from eamvit.experiments.prune_sweep import figure_data
    from eamvit.methods.prune import method_config
    from eamvit.ops.scores import default_blocks
    from eamvit.plots.prune import plot_entropy_histograms, plot_kept_patches

    ev, cfg = sp.eval_set, sp.data_config
    idx = list(sp.eval_indices) if sp.eval_indices is not None else list(range(len(ev)))
    items = [it for it in (ev[i] for i in idx[:32]) if it is not None]
    if not items:
        return
    device = next(model.parameters()).device
    images = torch.stack([it[0] for it in items]).to(device)
    configs = [method_config(m, a, args.keep_rates[0], **prune_options(args)) for m, a in methods]
    blocks = configs[0].blocks or default_blocks(len(model.blocks))
    masks, entropies = figure_data(model, images, configs)
    plot_kept_patches(images[0], masks, out / "kept_patches.png", mean=cfg["mean"], std=cfg["std"], blocks=blocks,
                      title=f"Kept patches per pruning stage (κ = {args.keep_rates[0]:g})")
    plot_entropy_histograms(entropies, out / "token_entropy.png",
                            title=f"Attention-entropy distributions per block ({len(images)} images)")


def _finetune_data(args, model):
    """Training and validation sets of ``finetune`` and the data config they follow (overrides applied)."""
    from torch.utils.data import Subset

    from eamvit.methods.data import build_dataset, random_subset
    from eamvit.methods.models import data_config
    from eamvit.methods.train import train_dataset

    cfg = data_config(model, data_overrides(args))  # --img-size included
    if args.data == "digits":
        fixed = [f"--{k.replace('_', '-')}" for k, v in data_overrides(args).items() if v is not None]
        if fixed:
            raise EamError(f"{', '.join(fixed)} cannot change the digits' preprocessing (fixed 8x8 -> bilinear "
                           "upsampling, mean/std 0.5); drop them or use an image folder")
    train = train_dataset(args.data, cfg, augment=args.augment, strict_images=args.strict_images)
    warn_class_mismatch(train, model, args.data)
    if args.num_samples:
        train = Subset(train, random_subset(train, args.num_samples, args.seed))
    if args.val_data:
        val = build_dataset(args.val_data, cfg, strict_images=args.strict_images)
        warn_class_mismatch(val, model, args.val_data)
    else:
        val = build_dataset("digits", split="test", img_size=int(cfg["input_size"][-1])) \
            if args.data == "digits" else None
    return train, val, cfg


_PRUNE_ONLY = (*PRUNE_OPTIONS[1:], "keep_warmup_epochs", "keep_decay_epochs")


def _finetune_configs(args):
    """``(PruneConfig or MergeConfig or None, FinetuneConfig, FreezeConfig or None)`` of ``finetune``, checked
    before any work: freezing with ``--tau > 0``, pruning by :func:`~eamvit.methods.finetune.prune_method`."""
    from eamvit.methods.finetune import FinetuneConfig, prune_method

    freezes = (args.tau or 0) > 0
    if args.maps and not freezes:
        raise EamError("--maps is used to freeze attention: give --tau > 0 with it, or drop it")
    refuse_merge_args(args)
    if args.merge:  # the keep rate and its schedule are pruning's
        refuse_given(args, _PRUNE_ONLY, f"to --merge {args.merge} (no tokens are pruned)")
    method = prune_method(args.prune, freezes, bool(args.merge))
    pcfg = merge_config(args) if args.merge else prune_config(args, method) if method else None
    zcfg = freeze_config(args)  # checks the freezing options even when nothing is frozen
    zcfg = zcfg if freezes else None
    fcfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
                          warmup_lr=args.warmup_lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                          label_smoothing=args.label_smoothing, mixup=args.mixup, cutmix=args.cutmix,
                          grad_clip=args.grad_clip, seed=args.seed, **given_values(
                              keep_warmup_epochs=args.keep_warmup_epochs, keep_decay_epochs=args.keep_decay_epochs))
    return pcfg, fcfg, zcfg


def _reload_hint(args, out: Path, reducer, frozen: bool) -> str:
    """The ``eamvit eval`` line that reloads what ``finetune`` wrote (``reducer``: its pruning or merging config)."""
    import shlex

    from eamvit.experiments.optimize_space import recipe_options
    from eamvit.methods.prune import setting_text
    from eamvit.methods.recipe import Recipe

    parts = ["eamvit", "eval"]
    if args.model:
        parts += ["--model", args.model] + (["--model-kwargs", *args.model_kwargs] if args.model_kwargs else [])
    parts += ["--checkpoint", str(out / "finetuned.safetensors")]
    if frozen:
        parts += ["--frozen", str(out / "frozen.safetensors")]
    pruned = reducer is not None and reducer.KIND == "prune"
    if pruned:
        parts += ["--prune", reducer.method, "--keep-rate", str(setting_text(reducer.keep_rate))]
    elif reducer is not None:  # every merging setting: the options that rebuild the config
        parts += recipe_options(Recipe(steps=(reducer,)))
    return " ".join(shlex.quote(p) for p in parts) + (" (and the same pruning options)" if pruned else "")


def cmd_finetune(args) -> None:
    from eamvit.experiments.speed_sweep import check_family
    from eamvit.methods.finetune import FROZEN, WEIGHTS, finetune
    from eamvit.methods.recipe import Recipe, apply_

    pcfg, fcfg, zcfg = _finetune_configs(args)
    check_output_dir(args.out)
    model, device = load_model(args)
    loaded = load_maps(args, model)  # a wrong --maps fails before anything is written
    reducers, merging = [pcfg] if pcfg is not None else [], pcfg is not None and pcfg.KIND == "merge"
    check_family(model, [zcfg.granularity] if zcfg is not None else [], [] if merging else reducers,
                 reducers if merging else [])
    train, val, cfg = _finetune_data(args, model)
    out = ensure_writable_dir(args.out)
    reports = apply_(model, Recipe(steps=tuple(s for s in (zcfg, pcfg) if s is not None)), None,
                     maps=lambda m: loaded if loaded is not None else get_maps(  # else calibrated now, saved in OUT
                         args, m, device, data_splits(args, m, need_calib=True, evaluate=False), out_dir=out),
                     device=device)
    freeze = reports["freeze"].to_dict() if "freeze" in reports else None
    flush_warnings()  # the inputs are checked: before the training, not after it
    res = finetune(model, train, fcfg, val_ds=val, out_dir=out, resume=not args.no_resume, device=device,
                   workers=args.workers, data_config=cfg, freeze=zcfg)
    last = res["final"] or {}
    skipped = f" ({res['skipped_images']} unreadable skipped)" if res.get("skipped_images") else ""
    print(f"fine-tuned {res['epochs_done']} epochs on {res['images']} images{skipped}: "
          + " ".join(f"{k}={v}" for k, v in last.items()))
    if freeze is not None:
        print(f"frozen: {freeze['frozen_fraction']:.4f} of the attention entries ({zcfg.granularity}, "
              f"{zcfg.selection}); the frozen values are not trained")
    frozen = f", {out / FROZEN} (the frozen attention)" if zcfg is not None else ""
    print(f"wrote {out / WEIGHTS} (plain timm weights){frozen}, {out / 'finetune.json'}, "
          f"checkpoint {res['checkpoint']}")
    print(f"reload: {_reload_hint(args, out, pcfg, zcfg is not None)}")


def register(sub) -> None:
    """Add this group's sub-commands to the ``eamvit`` parser."""
    s = sub.add_parser("finetune", help="fine-tune a model with pruned or merged tokens and/or frozen attention "
                       "(EViT recipe), resumable")
    add_model_args(s)
    add_data_args(s, calib=False)
    add_entropy_args(s)
    add_freeze_args(s, saved=False)
    add_prune_args(s)
    add_merge_args(s)
    set_help(s,  # the shared texts speak of evaluation; here the data are the training set
             data="training data: an ImageFolder root (root/<class>/<image>) or 'digits' (its training split)",
             num_samples="train on a seeded random subset of this many training images (default: all)",
             seed="seed of the subset, shuffling, augmentation, mixup, dropout and random freezing",
             batch_size="images per training step",
             workers="DataLoader worker processes (the trained weights do not depend on their number)",
             maps="entropy maps from `eamvit calibrate`, used with --tau > 0 (default: calibrate now on up to 512 "
                  "unaugmented training images, saved to OUT/maps.safetensors)",
             tau="fraction of attention entries to freeze and fine-tune around, [0, 1]; 0 = no freezing (default 0)",
             prune="prune patch tokens with this score (default: shannon without --tau or --merge, else none; give "
                   "--prune and --tau to prune and freeze)")
    f = s.add_argument_group("fine-tuning (defaults: EViT's recipe)")
    f.add_argument("--val-data", default=None,
                   help="ImageFolder evaluated after each epoch (default: none; --data digits: the test split)")
    f.add_argument("--augment", choices=AUGMENTS, default="auto",
                   help="training augmentation: none (the evaluation preprocessing), shift (it, then random cyclic "
                        "shifts up to 1/8 of the side), imagenet (timm's random-resized crop, flip, colour jitter); "
                        f"auto: imagenet for inputs of at least {IMAGENET_MIN_SIZE} px a side, else shift")
    f.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    f.add_argument("--lr", type=float, default=2e-5, help="peak AdamW learning rate (absolute, not scaled by batch)")
    f.add_argument("--min-lr", type=float, default=2e-6, help="final learning rate of the per-step cosine schedule")
    f.add_argument("--warmup-epochs", type=float, default=0.0, help="epochs of linear learning-rate warm-up")
    f.add_argument("--warmup-lr", type=float, default=1e-6, help="learning rate at the start of the warm-up")
    f.add_argument("--weight-decay", type=float, default=1e-6,
                   help="AdamW weight decay (none on biases, norms, class and position tokens)")
    f.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    f.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value (default: off)")
    f.add_argument("--mixup", type=float, default=0.0, help="timm mixup alpha (DeiT: 0.8)")
    f.add_argument("--cutmix", type=float, default=0.0, help="timm cutmix alpha (DeiT: 1.0)")
    f.add_argument("--keep-warmup-epochs", type=float, default=None,
                   help="epochs at keep rate 1 first (EViT: 10 from scratch) (default: 0.0)")
    f.add_argument("--keep-decay-epochs", type=float, default=None,
                   help="epochs of cosine from 1 to --keep-rate (EViT: 100) (default: 0.0)")
    f.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")
    s.add_argument("--out", default="eamvit-finetune",
                   help="output folder (checkpoint, weights, frozen attention, history)")
    s.set_defaults(func=cmd_finetune)
