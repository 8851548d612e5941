"""``calibrate``, ``eval``, ``sweep`` and ``plot``: entropy maps, frozen attention, figures."""
from __future__ import annotations

import argparse
import contextlib
import copy
from dataclasses import replace
from pathlib import Path

from eamvit.methods.state import step_config
from eamvit.errors import EamError
from eamvit.io import check_output_dir, check_output_file, ensure_writable_dir, output_lock, results_paths
from eamvit.cli.common import (compute_maps, data_splits, eval_data, flush_warnings, get_maps, is_main,
                               load_maps, load_model, print_row, warn)
from eamvit.cli.options import (SPEED_KEEP_RATES, SPEED_METHODS, add_data_args, add_entropy_args, add_freeze_args,
                                add_model_args, add_prune_args, given_values, ints, orders_arg, prune_options)
from eamvit.cli.export import add_eval_onnx_args, cmd_eval_onnx
from eamvit.cli.prune import add_per_block_args, check_per_block, cmd_prune_sweep, sweep_methods
from eamvit.cli.quant import add_quant_args, calib_set, quant_config
from eamvit.cli.recipe import add_stack_args, apply_args, needs_calibration, recipe_from_args


def cmd_calibrate(args) -> None:
    from eamvit.ops.attention_stats import check_orders

    out = check_output_file(args.out)
    if args.num_samples is not None:
        raise EamError("calibrate evaluates nothing: choose its images with --calib-size, not --num-samples")
    check_orders(args.renyi_orders or ())  # before the model and the data are loaded
    model, device = load_model(args)
    # The user chose these images by pointing calibrate at them: all of them by default (the paper's
    # maps use 5 % of ImageNet's training set, far more than the 32 images of PTQ calibration).
    sp = data_splits(args, model, need_calib=True, evaluate=False, calib_all=True)
    with output_lock(out):
        maps = compute_maps(args, model, device, sp, meta={"data": str(args.calib_data or args.data)},
                            resume_path=str(out) + ".partial" if args.resume else None, distance=args.distance,
                            renyi_orders=args.renyi_orders or ())
        if is_main():
            maps.save(out)
            skipped = maps.meta["skipped_images"]
            print(f"wrote {out}: {maps.num_layers} layers, M={maps.meta['num_images']} images, b={maps.meta['bits']}"
                  + (f", {skipped} unreadable images skipped" if skipped else "") + _stats_line(maps))


def _stats_line(maps) -> str:
    """What the maps hold besides the entropy, for the line calibrate prints (empty: nothing)."""
    from eamvit.ops.attention_stats import format_order

    parts = (["attention distance"] if maps.distance is not None else []) + (
        [f"Rényi histograms (α = {','.join(format_order(a) for a in maps.renyi_orders)})"]
        if maps.renyi is not None else [])
    if not parts:
        return ""
    measured = maps.distance if maps.distance is not None else maps.renyi
    return f"; {' and '.join(parts)} of {sum(t is not None for t in measured)} layers"


def cmd_eval(args) -> None:
    if args.onnx:
        return cmd_eval_onnx(args)
    from eamvit.methods.evaluate import evaluate, result_row

    csv_path = None
    if args.out is not None:  # a stem: STEM.csv and STEM.json
        check_output_file(args.out)
        csv_path = check_output_file(results_paths(args.out)[0])
    recipe = recipe_from_args(args)  # before the model: its configs check the options
    model, device = load_model(args)
    maps = load_maps(args, model)
    sp = data_splits(args, model, need_calib=needs_calibration(args, recipe), maps=maps)
    with output_lock(csv_path) if csv_path is not None else contextlib.nullcontext():
        _, extra = apply_args(args, model, device, sp, maps)
        flush_warnings()  # before the evaluation, not after its results
        m = evaluate(model, sp.eval_set, sp.eval_indices, batch_size=args.batch_size, workers=args.workers,
                     device=device)
        print_row({**result_row(model, m, sp.data_config, **extra), "calib_excluded": sp.calib_excluded}, args.out)


def cmd_sweep(args) -> None:
    from eamvit.experiments.freeze_sweep import freeze_sweep
    from eamvit.experiments.results import format_sweep_table, write_table
    from eamvit.methods.freeze import FreezeConfig
    from eamvit.plots.entropy import plot_sweep

    check_per_block(args)
    if args.granularity is not None:
        return cmd_speed_sweep(args)
    if args.prune:
        return cmd_prune_sweep(args)
    if args.quant or args.quant_state:
        return cmd_quant_sweep(args)
    out = ensure_writable_dir(args.out)
    model, device = load_model(args)
    maps, data = _sweep_data(args, model, device, out)
    base = data.evaluate(model)
    flush_warnings()  # before the sweep, not after its results
    rows = []
    for scope in args.scopes:
        freeze = FreezeConfig(scope=scope, value_bits=args.value_bits,
                              **given_values(value_quantizer=args.value_quantizer))
        rows += freeze_sweep(model, maps, data, args.taus, freeze, seeds=range(args.seed, args.seed + args.seeds),
                             progress=is_main())
    if is_main():
        files = write_table(out / "sweep", rows)
        plot_sweep(rows, out / "sweep.png", title=f"{rows[0]['model']}: entropy vs random freezing",
                   reference={"unfrozen": base["top1"]})
        print(format_sweep_table(rows))
        print("wrote " + ", ".join(str(f) for f in [*files.values(), out / "sweep.png"]))


def _sweep_data(args, model, device, out: Path):
    """``(maps, EvalData)`` of the freezing sweeps: ``--maps`` (its images unscored), or maps made now in ``out``."""
    maps = load_maps(args, model)
    sp = data_splits(args, model, need_calib=maps is None,
                     calibrated_on=[(str(args.maps), maps.meta.get("calibration"))] if maps else [])
    maps = get_maps(args, model, device, sp, out_dir=out, maps=maps)
    return maps, eval_data(args, sp, device)


def cmd_speed_sweep(args) -> None:
    """``sweep --granularity G,...``: freezing by those units, token pruning and merging at measured speed."""
    from eamvit.experiments.prune_sweep import matched_merges
    from eamvit.experiments.results import markdown, write_table
    from eamvit.experiments.runner import Timing
    from eamvit.experiments.speed_sweep import (SPEED_COLUMNS, check_family, supports, plot_rows, speed_sweep,
                                                summary_lines)
    from eamvit.methods.freeze import FreezeConfig
    from eamvit.methods.prune import method_config
    from eamvit.plots.speed import plot_top1_vs_speedup

    if args.prune or args.quant or args.quant_state:
        raise EamError("--granularity sweeps freezing against pruning in float; drop --prune/--quant/--quant-state")
    methods, merges = sweep_methods(args, SPEED_METHODS, SPEED_KEEP_RATES)
    prune = [method_config(m, a, k, **prune_options(args)) for m, a in methods for k in args.keep_rates if k < 1]
    base = FreezeConfig(**given_values(aggregate=args.aggregate, value_bits=args.value_bits,
                                       value_quantizer=args.value_quantizer))
    freeze = [replace(base, tau=t, granularity=g) for g in args.granularity for t in args.taus if t > 0]
    model, device = load_model(args)
    if not supports(model, "prune") and args.methods is None:
        prune, merges = [], []
        warn("token pruning and merging do not apply to this model's attention family (`eamvit models`): the "
             "speed sweep has freezing points only")
    check_family(model, args.granularity, prune, merges)
    out = ensure_writable_dir(args.out)
    maps, data = _sweep_data(args, model, device, out)
    flush_warnings()
    matched = matched_merges(model, [k for k in args.keep_rates if k < 1], merges, prune_options(args))
    rows = speed_sweep(model, maps, data, freeze, prune, matched,
                       Timing(**given_values(batch_size=args.throughput_batch, reps=args.throughput_reps)), is_main())
    if is_main():
        files = write_table(out / "speed_sweep", rows, formats=("csv", "json"))  # every field, to diff
        files.update(write_table(out / "speed_sweep", rows, SPEED_COLUMNS, formats=("md",)))
        plot_top1_vs_speedup(plot_rows(rows), out / "speed_sweep.png",
                             title=f"{rows[0]['model']}: frozen attention vs token pruning"
                                   + (" and merging" if merges else "") + " at measured speed")
        print(markdown(rows, SPEED_COLUMNS))
        print("\n".join(summary_lines(rows)))
        print("wrote " + ", ".join(str(f) for f in [*files.values(), out / "speed_sweep.png"]))


def cmd_quant_sweep(args) -> None:
    """``eamvit sweep --quant repq``: FP, RepQ-ViT and the EAM variants for every τ, Table 1, sizes, KL maps."""
    from eamvit.experiments.quant_sweep import QuantSweepConfig, quant_sweep
    from eamvit.methods.calibrate import parse_bytes
    from eamvit.methods.quantize import load_quantized
    from eamvit.methods.repq import RepQConfig

    if getattr(args, "maps", None):
        raise EamError("sweep --quant computes entropy maps on both the FP and the quantized model; drop --maps")
    if len(args.scopes) != 1:
        raise EamError("sweep --quant takes one --scopes value")
    out = ensure_writable_dir(args.out)
    model, device = load_model(args)
    sp = data_splits(args, model, need_calib=True)
    q_model, qcfg = None, quant_config(args)
    if getattr(args, "quant_state", None):
        q_model = copy.deepcopy(model)
        load_quantized(q_model, args.quant_state)
        qcfg = step_config(q_model, "quant")  # the rows and titles say what the state holds, not the defaults
        if not isinstance(qcfg, RepQConfig):
            raise EamError(f"sweep --quant-state needs a RepQ-ViT state; {args.quant_state} holds "
                           f"{type(qcfg).__name__.removesuffix('Config')}")
    sweep = QuantSweepConfig(taus=tuple(args.taus), scope=args.scopes[0], **given_values(entropy_bits=args.bits),
                             frozen_bits=args.frozen_bits, random_seeds=tuple(range(args.seed, args.seed + args.seeds)),
                             max_memory=parse_bytes(args.max_memory) if args.max_memory else None)
    data = eval_data(args, sp, device)
    flush_warnings()
    res = quant_sweep(model, data, sp.calib_set, qcfg, sweep, map_indices=sp.calib_indices, repq_calib=calib_set(sp),
                      q_model=q_model)
    _write_quant_sweep(res, out, title=f"{res['rows'][0]['model']}: EAM on RepQ-ViT W{qcfg.w_bits}/A{qcfg.a_bits}")
    print(res["table"])


def _write_quant_sweep(res: dict, out: Path, title: str) -> None:
    """sweep.*, table1.*, sizes.*, kl_per_head.* (CSV, JSON, markdown) and the figures."""
    from eamvit.experiments.quant_sweep import size_table
    from eamvit.experiments.results import write_table
    from eamvit.plots.quant import plot_kl_cls, plot_kl_per_head, plot_quant_sweep

    rows, kl = res["rows"], res["kl"]
    files = list(write_table(out / "sweep", rows).values())
    files += write_table(out / "table1", *res["table1"]).values()
    files += write_table(out / "sizes", *size_table(rows)).values()
    files += write_table(out / "kl_per_head", kl.summary()).values()
    plot_quant_sweep(rows, out / "sweep.png", title=title)
    plot_kl_per_head(kl, out / "kl_per_head.png")
    files += [out / "sweep.png", out / "kl_per_head.png"]
    if kl.cls_rows(0) is not None:
        plot_kl_cls(kl, 0, out / "kl_cls_L0.png")
        files.append(out / "kl_cls_L0.png")
    print("wrote " + ", ".join(str(f) for f in files))


def cmd_plot(args) -> None:
    from eamvit.methods.calibrate import EntropyMaps
    from eamvit.plots.entropy import plot_cls_entropy, plot_full_entropy, plot_head_summary
    from eamvit.plots.renyi import plot_entropy_distance, plot_renyi_histograms

    check_output_dir(args.out)
    maps = EntropyMaps.load(args.maps)
    n = maps.num_layers
    for l in args.layers:
        if not 0 <= l < n:
            raise EamError(f"--layers {l} is outside 0..{n - 1}")
    pairs = [tuple(p) for p in args.pairs] if args.pairs else [(0, 0), (min(1, n - 1), 0)]
    for l, h in pairs:
        heads = maps.entropy[l].shape[-3] if 0 <= l < n else 0
        if not (0 <= l < n and 0 <= h < heads):
            raise EamError(f"--pairs {l},{h} is outside the model (layers 0..{n - 1}, heads 0..{max(heads, 1) - 1})")
    out = ensure_writable_dir(args.out)  # only once every input is known to be good
    cls_rows = maps.entropy[0].dim() == 3
    figures = [(plot_cls_entropy, (l,), f"cls_entropy_L{l}.png") for l in (args.layers if cls_rows else [])]
    figures += [(plot_full_entropy, (pairs,), "full_entropy.png"), (plot_head_summary, (), "head_entropy.png")]
    notes = []
    for kind, name, option, draw in (("distance", "entropy_distance.png", "--distance", plot_entropy_distance),
                                     ("renyi", "renyi_entropy.png", "--renyi-orders", plot_renyi_histograms)):
        if getattr(maps, kind) is not None:
            figures.append((draw, (), name))
        else:
            notes.append(f"no {name}: these maps were calibrated without {option}")
    for draw, extra, name in figures:
        draw(maps, *extra, out / name)
    print("\n".join(["wrote " + ", ".join(str(out / name) for *_, name in figures), *notes]))


def _pair(text: str) -> tuple[int, int]:
    try:
        l, h = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER,HEAD (0-based), got {text!r}") from None
    return l, h


def register(sub) -> None:
    """Add this group's sub-commands to the ``eamvit`` parser."""
    s = sub.add_parser("calibrate", help="compute entropy attention maps and save them (.safetensors)")
    add_model_args(s)
    add_data_args(s)
    add_entropy_args(s)
    s.add_argument("--out", required=True, help="maps file to write (.safetensors)")
    s.add_argument("--resume", action="store_true", help="checkpoint to OUT.partial and resume from it")
    g = s.add_argument_group("attention statistics (the Rényi pruning paper's Fig. 5 and 6, drawn by `eamvit plot`; "
                             "of the layers that attend over the whole patch grid, as ViT's do; others are left out)")
    g.add_argument("--distance", action="store_true", help="also store per layer and head the mean attention "
                   "distance (patches, over patch keys, as Dosovitskiy et al.) and patch rows' mean entropy (nats)")
    g.add_argument("--renyi-orders", type=orders_arg, default=None, metavar="ORDERS", help="also store per-layer "
                   "histograms of per-token Rényi entropies (--prune renyi's scores) of these orders, e.g. "
                   "0.5,1,2,inf (1: Shannon) (default: not stored)")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("eval", help="top-1/top-5, optionally with frozen attention")
    add_stack_args(s)
    add_eval_onnx_args(s)
    s.add_argument("--out", default=None, help="results stem: writes STEM.csv and STEM.json, eval_0.2 -> eval_0.2.csv "
                   "(default: print the row only)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("sweep", help="top-1 against sparsity for entropy and random freezing (CSV, JSON, PNG)")
    add_model_args(s)
    add_data_args(s)
    add_entropy_args(s)
    add_freeze_args(s, sweep=True)
    add_prune_args(s, sweep=True)
    add_per_block_args(s)
    add_quant_args(s, "sweep")
    s.add_argument("--out", default="eamvit-sweep", help="output folder")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("plot", help="figures of saved entropy maps (Fig. 2, Fig. 3, head summary; with calibrate "
                       "--distance / --renyi-orders, entropy vs attention distance, Rényi entropy histograms)")
    s.add_argument("--maps", required=True, help="entropy maps file written by `eamvit calibrate`")
    s.add_argument("--layers", type=ints, default=[0], help="layers of the CLS-row maps, e.g. 0,1; 0-based as every "
                   "layer and head number in eamvit (cls_entropy_L0.png is layer 0)")
    s.add_argument("--pairs", type=_pair, nargs="+", default=None,
                   help="0-based LAYER,HEAD pairs of the full N x N maps, e.g. 0,0 1,2 (default: 0,0 and 1,0)")
    s.add_argument("--out", default="eamvit-plots", help="output folder of cls_entropy_L*.png, full_entropy.png, "
                   "head_entropy.png, entropy_distance.png and renyi_entropy.png (where the maps hold them)")
    s.set_defaults(func=cmd_plot)
