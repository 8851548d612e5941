"""The ``eamvit`` command: thin argument parsing over the Python API.

Every user error is an :class:`~eamvit.errors.EamError`: one line on stderr, exit status 2, and no
output file is left half-written (all writes are atomic).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import EamError


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


# ----------------------------------------------------------------------------------------- options
def add_model_args(p: argparse.ArgumentParser) -> None:
    from timm.utils import ParseKwargs

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="timm model name (default: the bundled digits ViT)")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="timm.create_model overrides, e.g. img_size=16 patch_size=2 in_chans=1 num_classes=10")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--pretrained", action="store_true", help="weights from the local timm / Hugging Face cache")
    w.add_argument("--checkpoint", default=None, help="state dict file (.pth, .pt, .safetensors)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")


def add_data_args(p: argparse.ArgumentParser, calib: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits",
                   help="ImageFolder root (ImageNet val layout) or 'digits' (scikit-learn's bundled digits)")
    g.add_argument("--num-samples", type=int, default=None, help="evaluate on a seeded random subset of this size")
    if calib:
        g.add_argument("--calib-data", default=None,
                       help="ImageFolder for calibration; default: a held-out part of --data "
                            "(digits: the training split)")
        g.add_argument("--calib-size", type=int, default=None,
                       help="calibration images (default: 512, or the whole digits training split)")
    g.add_argument("--seed", type=int, default=0, help="seed of the subsets and random freezing")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--strict-images", action="store_true", help="fail on an unreadable image instead of skipping it")
    t = p.add_argument_group("preprocessing overrides (default: the model's timm data config)")
    t.add_argument("--img-size", type=int, default=None)
    t.add_argument("--crop-pct", type=float, default=None)
    t.add_argument("--crop-mode", default=None, choices=["center", "squash", "border"])
    t.add_argument("--mean", type=float, nargs="+", default=None)
    t.add_argument("--std", type=float, nargs="+", default=None)
    t.add_argument("--interpolation", default=None, choices=["bilinear", "bicubic", "nearest", "random"])


def add_entropy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("entropy maps")
    g.add_argument("--maps", default=None, help="entropy maps from `eamvit calibrate` (default: calibrate now)")
    g.add_argument("--bits", type=int, default=8, help="histogram bits b: 2^b bins on [0, 1] (1..16)")
    g.add_argument("--max-memory", default=None, help="histogram memory budget, e.g. 2G (more passes if needed)")


def add_freeze_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    from .freeze import SCOPES, SELECTIONS, VALUE_QUANTIZERS

    g = p.add_argument_group("freezing")
    if sweep:
        g.add_argument("--taus", type=_floats, default=[round(0.1 * i, 1) for i in range(10)],
                       help="sparsity levels, e.g. 0,0.1,0.2 (default 0..0.9)")
        g.add_argument("--scopes", nargs="+", choices=SCOPES, default=["head"])
        g.add_argument("--seeds", type=int, default=3, help="random-freezing seeds averaged per point")
    else:
        g.add_argument("--tau", type=float, default=0.0, help="fraction of attention entries to freeze, [0, 1]")
        g.add_argument("--scope", choices=SCOPES, default="head")
        g.add_argument("--selection", choices=SELECTIONS, default="entropy")
    g.add_argument("--value-bits", type=int, default=None, help="precision of frozen values (default fp32)")
    g.add_argument("--value-quantizer", choices=VALUE_QUANTIZERS, default="uniform")


def _alpha(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity", "∞"):
        return float("inf")
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a Rényi order such as 0.5, 2 or inf, got {text!r}") from None


def add_prune_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """Token-pruning options (eamvit.prune); ``sweep`` adds the κ × method grid of ``sweep --prune``."""
    from .prune import KEYS, METHODS, PLACEMENTS

    g = p.add_argument_group("token pruning")
    if sweep:
        g.add_argument("--prune", action="store_true", help="sweep token pruning (keep rate x method) instead of freezing")
        g.add_argument("--keep-rates", type=_floats, default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
                       help="keep rates, e.g. 0.9,0.7,0.5 (default 0.9..0.3)")
        g.add_argument("--methods", default="shannon,renyi:0.5,renyi:2,renyi:3,renyi:inf,evit,random",
                       help="methods, renyi:ORDER for Rényi (default: all of the seed's)")
        g.add_argument("--no-throughput", action="store_true", help="skip the images/s measurement")
        g.add_argument("--throughput-batch", type=int, default=32, help="images per timed forward")
    else:
        g.add_argument("--prune", choices=METHODS, default=None, help="prune patch tokens with this score")
        g.add_argument("--keep-rate", type=float, default=0.7, help="keep rate κ in (0, 1]")
        g.add_argument("--alpha", type=_alpha, default=2.0, help="Rényi order for --prune renyi (0, 0.5, 2, inf...)")
    g.add_argument("--prune-blocks", type=_ints, default=None,
                   help="0-based pruning blocks (default: 3,6,9 of 12, scaled to the depth)")
    g.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse dropped tokens into one (default: on for EViT only)")
    g.add_argument("--placement", choices=PLACEMENTS, default="attn",
                   help="prune after the attention residual (attn, EViT) or after the whole block")
    g.add_argument("--entropy-keys", choices=KEYS, default="all",
                   help="entropy of the whole attention row (all) or of its patch keys renormalised (patches)")


def prune_options(args) -> dict:
    return {"blocks": args.prune_blocks, "fuse": args.fuse, "placement": args.placement, "keys": args.entropy_keys}


# ------------------------------------------------------------------------------------------ helpers
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EamError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EamError(f"device {name} requested but CUDA is not available; use --device cpu")
    return dev


def _init_distributed(device) -> None:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    import torch
    import torch.distributed as dist

    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def _is_main() -> bool:
    from .calibrate import dist_info

    return dist_info()[0] == 0


def load_model(args):
    """The model the arguments name (the bundled digits ViT when none is named)."""
    from .digits import load_demo_model
    from .models import create_model

    device = _device(args.device)
    _init_distributed(device)
    if args.model is None:
        if args.pretrained or args.model_kwargs:
            raise EamError("--pretrained/--model-kwargs need --model NAME")
        return load_demo_model(args.checkpoint, device=device), device
    return create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                        model_kwargs=args.model_kwargs, device=device), device


def data_overrides(args) -> dict:
    ov = {"crop_pct": args.crop_pct, "crop_mode": args.crop_mode, "mean": args.mean, "std": args.std,
          "interpolation": args.interpolation}
    return ov


def build_data(args, model, need_calib: bool):
    """``(eval dataset, eval indices, calib dataset, calib indices, data config)`` from the arguments."""
    from .data import build_dataset, random_subset
    from .models import data_config

    ov = data_overrides(args)
    cfg = data_config(model, ov)
    if args.img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], args.img_size, args.img_size)
    if args.data == "digits":
        img = cfg["input_size"][-1]
        ev = build_dataset("digits", split="test", img_size=img)
        cal = build_dataset("digits", split="train", img_size=img) if need_calib else None
        ev_idx = random_subset(ev, args.num_samples, args.seed) if args.num_samples else None
        cal_idx = random_subset(cal, args.calib_size, args.seed) if need_calib and args.calib_size else None
        return ev, ev_idx, cal, cal_idx, cfg
    ev = build_dataset(args.data, cfg, strict_images=args.strict_images)
    calib_size = getattr(args, "calib_size", None)
    if not need_calib:
        ev_idx = random_subset(ev, args.num_samples, args.seed) if args.num_samples else None
        return ev, ev_idx, None, None, cfg
    if args.calib_data:
        cal = build_dataset(args.calib_data, cfg, strict_images=args.strict_images)
        cal_idx = random_subset(cal, min(calib_size or 512, len(cal)), args.seed)
        ev_idx = random_subset(ev, args.num_samples, args.seed) if args.num_samples else None
        return ev, ev_idx, cal, cal_idx, cfg
    # Calibrate on a held-out part of the same folder; evaluation never sees those images.
    size = calib_size or min(512, len(ev) // 2)
    cal_idx = random_subset(ev, size, args.seed)
    ev_idx = random_subset(ev, args.num_samples, args.seed + 1, exclude=cal_idx) if args.num_samples else \
        random_subset(ev, None, exclude=cal_idx)
    if not ev_idx:
        raise EamError(f"--calib-size {size} leaves no images of {args.data} to evaluate; lower it or pass --calib-data")
    return ev, ev_idx, ev, cal_idx, cfg


def get_maps(args, model, device, cal, cal_idx, cfg, out_dir: Optional[Path] = None):
    from .calibrate import EntropyMaps, compute_entropy_maps, parse_bytes

    if args.maps:
        maps = EntropyMaps.load(args.maps)
        maps.check_model(model, source=f"maps {args.maps}")
        return maps
    maps = compute_entropy_maps(model, cal, indices=cal_idx, bits=args.bits, batch_size=args.batch_size,
                                workers=args.workers, device=device,
                                max_memory=parse_bytes(args.max_memory) if args.max_memory else None,
                                meta={"transforms": _jsonable(cfg), "seed": args.seed})
    if out_dir is not None and _is_main():
        maps.save(out_dir / "maps.safetensors")
    return maps


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _validate_common(args) -> None:
    from .entropy import check_bits
    from .freeze import FreezeConfig

    if hasattr(args, "bits"):
        check_bits(args.bits)
    if hasattr(args, "tau"):
        FreezeConfig(tau=args.tau, scope=args.scope, selection=args.selection, value_bits=args.value_bits,
                     value_quantizer=args.value_quantizer).validate()
    if hasattr(args, "taus"):
        for t in args.taus:
            FreezeConfig(tau=t, value_bits=args.value_bits).validate()
        if args.seeds < 1:
            raise EamError("--seeds must be at least 1")
    from .quant.commands import validate_quant_args

    validate_quant_args(args)
    for name in ("batch_size", "num_samples", "calib_size"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise EamError(f"--{name.replace('_', '-')} must be at least 1, got {v}")


# ------------------------------------------------------------------------------------------ commands
def cmd_calibrate(args) -> None:
    from .calibrate import compute_entropy_maps, parse_bytes
    from .data import build_dataset, random_subset
    from .io import ensure_writable_dir
    from .models import data_config

    out = Path(args.out)
    ensure_writable_dir(out.parent if str(out.parent) else ".")
    model, device = load_model(args)
    cfg = data_config(model, data_overrides(args))
    if args.img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], args.img_size, args.img_size)
    # Calibration reads --calib-data if given, else --data (digits: the training split).
    source = args.calib_data or args.data
    cal = build_dataset(source, cfg, split="train", strict_images=args.strict_images, img_size=cfg["input_size"][-1])
    cal_idx = random_subset(cal, args.calib_size, args.seed) if args.calib_size else None
    maps = compute_entropy_maps(model, cal, indices=cal_idx, bits=args.bits, batch_size=args.batch_size,
                                workers=args.workers, device=device,
                                max_memory=parse_bytes(args.max_memory) if args.max_memory else None,
                                resume_path=str(out) + ".partial" if args.resume else None,
                                meta={"transforms": _jsonable(cfg), "seed": args.seed, "data": str(source)})
    if _is_main():
        maps.save(out)
        print(f"wrote {out}: {maps.num_layers} layers, M={maps.meta['num_images']} images, b={args.bits}"
              + (f", {maps.meta['skipped_images']} unreadable images skipped" if maps.meta["skipped_images"] else ""))


def cmd_eval(args) -> None:
    from .evaluate import evaluate, result_row
    from .freeze import FreezeConfig, freeze_
    from .io import ensure_writable_dir, write_results

    out = Path(args.out) if args.out else None
    if out:
        ensure_writable_dir(out.parent if str(out.parent) else ".")
    from .quant.commands import apply_quant, needs_quant_calib, value_deltas, wants_quant

    model, device = load_model(args)
    need_calib = (args.tau > 0 and not args.maps) or needs_quant_calib(args)
    ev, ev_idx, cal, cal_idx, cfg = build_data(args, model, need_calib=need_calib)
    extra = {"tau": args.tau}
    if wants_quant(args):  # before the maps: maps computed now are the quantized model's (EAM_4bits)
        extra.update(apply_quant(args, model, cal, cal_idx))
    if args.tau > 0 or args.maps:
        maps = get_maps(args, model, device, cal, cal_idx, cfg)
        rep = freeze_(model, maps, FreezeConfig(tau=args.tau, scope=args.scope, selection=args.selection,
                                                seed=args.seed, value_bits=args.value_bits,
                                                value_quantizer=args.value_quantizer),
                      value_deltas=value_deltas(model, args.value_quantizer))
        extra.update(scope=args.scope, selection=args.selection, frozen_fraction=round(rep.frozen_fraction, 6),
                     frozen_window_masked=rep.frozen_window_masked,
                     value_bits=args.value_bits if args.value_bits else 32)
    if args.prune:
        from .prune import PruneConfig, count_gflops, prune_

        prep = prune_(model, PruneConfig(method=args.prune, keep_rate=args.keep_rate, alpha=args.alpha,
                                         **prune_options(args)))
        extra.update(prune=args.prune, keep_rate=args.keep_rate, tokens="-".join(map(str, prep.tokens_per_stage)),
                     gflops=round(count_gflops(model), 4), unfrozen_layers=len(prep.unfrozen_layers))
        if args.prune == "renyi":
            extra["alpha"] = args.alpha if args.alpha != float("inf") else "inf"
    m = evaluate(model, ev, ev_idx, batch_size=args.batch_size, workers=args.workers, device=device)
    row = result_row(model, m, cfg, **extra)
    if _is_main():
        print(" ".join(f"{k}={v}" for k, v in row.items()))
        if out:
            csv_path, _ = write_results(out, [row])
            print(f"wrote {csv_path} and {csv_path.with_suffix('.json')}")


def cmd_sweep(args) -> None:
    from .evaluate import evaluate, freeze_sweep, result_row
    from .io import ensure_writable_dir, write_results
    from .plots import plot_sweep

    if args.prune:
        return cmd_prune_sweep(args)
    if args.quant or args.quant_state:
        from .quant.commands import cmd_quant_sweep

        return cmd_quant_sweep(args, load_model, build_data)
    out = ensure_writable_dir(args.out)
    model, device = load_model(args)
    ev, ev_idx, cal, cal_idx, cfg = build_data(args, model, need_calib=not args.maps)
    maps = get_maps(args, model, device, cal, cal_idx, cfg, out_dir=out)
    base = evaluate(model, ev, ev_idx, batch_size=args.batch_size, workers=args.workers, device=device,
                    progress=False)
    rows = []
    for scope in args.scopes:
        rows += freeze_sweep(model, maps, ev, args.taus, indices=ev_idx, scope=scope,
                             seeds=range(args.seed, args.seed + args.seeds), value_bits=args.value_bits,
                             value_quantizer=args.value_quantizer, batch_size=args.batch_size,
                             workers=args.workers, device=device)
    rows = [result_row(model, {k: v for k, v in r.items()}, cfg) for r in rows]
    if _is_main():
        write_results(out / "sweep", rows)
        plot_sweep(rows, out / "sweep.png", title=f"{rows[0]['model']}: entropy vs random freezing",
                   reference={"unfrozen": base["top1"]})
        print(format_sweep_table(rows))
        print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'}, {out / 'sweep.png'}")


def cmd_prune_sweep(args) -> None:
    from .evaluate import result_row
    from .io import ensure_writable_dir, write_results, write_text
    from .plots_prune import plot_top1_vs_gflops
    from .prune import markdown_table, method_config, parse_methods, prune_sweep

    methods = parse_methods(args.methods)
    for k in args.keep_rates:
        for m, a in methods:
            method_config(m, a, k, **prune_options(args))
    out = ensure_writable_dir(args.out)
    model, device = load_model(args)
    ev, ev_idx, _, _, cfg = build_data(args, model, need_calib=False)
    rows = prune_sweep(model, ev, args.keep_rates, methods, indices=ev_idx, batch_size=args.batch_size,
                       workers=args.workers, device=device, throughput=not args.no_throughput,
                       throughput_batch=args.throughput_batch, **prune_options(args))
    if _is_main():
        md = markdown_table(rows)
        rows = [result_row(model, {k: v for k, v in r.items()}, cfg) for r in rows]
        write_results(out / "prune_sweep", rows)
        write_text(out / "prune_sweep.md", md)
        plot_top1_vs_gflops(rows, out / "prune_sweep.png", title=f"{rows[0]['model']}: token pruning")
        _prune_figures(model, ev, ev_idx, methods, args, cfg, out)
        print(md)
        print(f"wrote {out / 'prune_sweep.csv'}, {out / 'prune_sweep.json'}, {out / 'prune_sweep.png'}")


def _prune_figures(model, ev, ev_idx, methods, args, cfg, out: Path) -> None:
    """The seed's Fig. 4 (kept patches of the first image) and Fig. 5 (token entropy histograms)."""
    import torch

    from .plots_prune import plot_entropy_histograms, plot_kept_patches
    from .prune import method_config

    idx = list(ev_idx) if ev_idx is not None else list(range(len(ev)))
    items = [it for it in (ev[i] for i in idx[:32]) if it is not None]
    if not items:
        return
    device = next(model.parameters()).device
    images = torch.stack([it[0] for it in items]).to(device)
    configs = [method_config(m, a, args.keep_rates[0], **prune_options(args)) for m, a in methods]
    plot_kept_patches(model, images[0], configs, out / "kept_patches.png", mean=cfg.get("mean"), std=cfg.get("std"))
    plot_entropy_histograms(model, images, out / "token_entropy.png")


def cmd_finetune(args) -> None:
    from .data import build_dataset
    from .finetune import FinetuneConfig, finetune, train_dataset
    from .io import ensure_writable_dir
    from .prune import PruneConfig, prune_

    pcfg = PruneConfig(method=args.prune, keep_rate=args.keep_rate, alpha=args.alpha, **prune_options(args)).validate()
    fcfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
                          weight_decay=args.weight_decay, batch_size=args.batch_size,
                          label_smoothing=args.label_smoothing, mixup=args.mixup, cutmix=args.cutmix,
                          keep_warmup_epochs=args.keep_warmup_epochs, keep_decay_epochs=args.keep_decay_epochs,
                          seed=args.seed, workers=args.workers).validate()
    out = ensure_writable_dir(args.out)
    model, device = load_model(args)
    train = train_dataset(args.data, model, strict_images=args.strict_images)
    if args.val_data:
        from .models import data_config

        val = build_dataset(args.val_data, data_config(model), strict_images=args.strict_images)
    else:
        val = build_dataset("digits", split="test", img_size=int(model.patch_embed.img_size[0])) \
            if args.data == "digits" else None
    prune_(model, pcfg)
    res = finetune(model, train, fcfg, val_ds=val, out_dir=out, resume=not args.no_resume, device=device)
    last = res["final"] or {}
    print(f"fine-tuned {res['epochs_done']} epochs: " + " ".join(f"{k}={v}" for k, v in last.items()))
    print(f"wrote {out / 'finetuned.safetensors'} (plain timm weights; prune at load time with the same options), "
          f"{out / 'finetune.json'}, checkpoint {res['checkpoint']}")


def format_sweep_table(rows: Sequence[dict]) -> str:
    """Markdown table: one row per τ, one column per (selection, scope)."""
    cols = []
    for r in rows:
        c = (r["selection"], r["scope"])
        if c not in cols:
            cols.append(c)
    taus = sorted({r["tau"] for r in rows})
    head = "| τ | " + " | ".join(f"{s} ({sc})" for s, sc in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for t in taus:
        cells = []
        for s, sc in cols:
            r = next((r for r in rows if r["tau"] == t and r["selection"] == s and r["scope"] == sc), None)
            if r is None:
                cells.append("")
            elif r.get("top1_std"):
                cells.append(f"{r['top1']:.2f} ± {r['top1_std']:.2f}")
            else:
                cells.append(f"{r['top1']:.2f}")
        lines.append(f"| {t:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_plot(args) -> None:
    from .calibrate import EntropyMaps
    from .io import ensure_writable_dir
    from .plots import plot_cls_entropy, plot_full_entropy, plot_head_summary

    maps = EntropyMaps.load(args.maps)
    out = ensure_writable_dir(args.out)
    n = maps.num_layers
    for l in args.layers:
        if not 0 <= l < n:
            raise EamError(f"--layers {l} is outside 0..{n - 1}")
    pairs = [tuple(p) for p in args.pairs] if args.pairs else [(0, 0), (min(1, n - 1), 0)]
    for l, h in pairs:
        heads = maps.entropy[l].shape[-3]
        if not (0 <= l < n and 0 <= h < heads):
            raise EamError(f"--pairs {l},{h} is outside the model (layers 0..{n - 1}, heads 0..{heads - 1})")
    written = []
    if maps.entropy[0].dim() == 3:
        for l in args.layers:
            plot_cls_entropy(maps, l, out / f"cls_entropy_L{l + 1}.png")
            written.append(out / f"cls_entropy_L{l + 1}.png")
    plot_full_entropy(maps, pairs, out / "full_entropy.png")
    plot_head_summary(maps, out / "head_entropy.png")
    written += [out / "full_entropy.png", out / "head_entropy.png"]
    print("wrote " + ", ".join(str(w) for w in written))


def _pair(text: str) -> tuple[int, int]:
    try:
        l, h = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER,HEAD (0-based), got {text!r}") from None
    return l, h


def cmd_train_digits(args) -> None:
    from .digits import TrainConfig, train_digits

    res = train_digits(args.out, TrainConfig(epochs=args.epochs, seed=args.seed), device=_device(args.device))
    print(f"wrote {args.out}: test top-1 {res['top1']:.2f}%")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(out=Path(args.out), retrain=args.retrain, checkpoint=args.checkpoint, device=_device(args.device),
             epochs=args.epochs)


# --------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from .digits import ASSET
    from .quant.commands import add_quant_args, cmd_quantize

    p = argparse.ArgumentParser(prog="eamvit", description="Entropy Attention Maps and attention-driven "
                                "compression for timm Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("demo", help="train/load the digits ViT, calibrate, sweep, write figures and a report")
    s.add_argument("--out", default="eamvit-demo", help="output folder")
    s.add_argument("--retrain", action="store_true", help="train the digits ViT instead of loading the shipped one")
    s.add_argument("--checkpoint", default=None, help="use this digits checkpoint instead of the shipped one")
    s.add_argument("--epochs", type=int, default=80, help="training epochs with --retrain")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("calibrate", help="compute entropy attention maps and save them (.safetensors)")
    add_model_args(s)
    add_data_args(s)
    add_entropy_args(s)
    s.add_argument("--out", required=True, help="maps file to write (.safetensors)")
    s.add_argument("--resume", action="store_true", help="checkpoint to OUT.partial and resume from it")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("eval", help="top-1/top-5, optionally with frozen attention")
    add_model_args(s)
    add_data_args(s)
    add_entropy_args(s)
    add_freeze_args(s)
    add_prune_args(s)
    add_quant_args(s, "eval")
    s.add_argument("--out", default=None, help="results stem: writes STEM.csv and STEM.json")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("sweep", help="top-1 against sparsity for entropy and random freezing (CSV, JSON, PNG)")
    add_model_args(s)
    add_data_args(s)
    add_entropy_args(s)
    add_freeze_args(s, sweep=True)
    add_prune_args(s, sweep=True)
    add_quant_args(s, "sweep")
    s.add_argument("--out", default="eamvit-sweep", help="output folder")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("quantize", help="RepQ-ViT post-training quantization; saves the quantized state")
    add_model_args(s)
    add_data_args(s)
    add_quant_args(s, "quantize")
    s.add_argument("--out", required=True, help="quantized state to write (.safetensors)")
    s.set_defaults(func=lambda a: cmd_quantize(a, load_model, build_data))

    s = sub.add_parser("compare", help="FP vs RepQ-ViT vs ADFQ-ViT vs PMQ: top-1, size, calibration time (CSV, markdown)")
    add_model_args(s)
    add_data_args(s)
    from .quant.compare import add_compare_args, cmd_compare

    add_compare_args(s)
    s.set_defaults(func=lambda a: cmd_compare(a, load_model, build_data))

    s = sub.add_parser("finetune", help="fine-tune a token-pruned model (EViT recipe), resumable")
    add_model_args(s)
    add_data_args(s, calib=False)
    add_prune_args(s)
    s.set_defaults(prune="shannon")
    f = s.add_argument_group("fine-tuning (defaults: EViT's recipe)")
    f.add_argument("--val-data", default=None, help="ImageFolder evaluated after each epoch (digits: the test split)")
    f.add_argument("--epochs", type=int, default=30)
    f.add_argument("--lr", type=float, default=2e-5)
    f.add_argument("--min-lr", type=float, default=2e-6)
    f.add_argument("--warmup-epochs", type=float, default=0.0)
    f.add_argument("--weight-decay", type=float, default=1e-6)
    f.add_argument("--label-smoothing", type=float, default=0.1)
    f.add_argument("--mixup", type=float, default=0.0, help="timm mixup alpha (DeiT: 0.8)")
    f.add_argument("--cutmix", type=float, default=0.0, help="timm cutmix alpha (DeiT: 1.0)")
    f.add_argument("--keep-warmup-epochs", type=float, default=0.0, help="epochs at keep rate 1 first (EViT: 10 from scratch)")
    f.add_argument("--keep-decay-epochs", type=float, default=0.0, help="epochs of cosine from 1 to --keep-rate (EViT: 100)")
    f.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")
    s.add_argument("--out", default="eamvit-finetune", help="output folder (checkpoint, weights, history)")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("plot", help="figures of saved entropy maps (Fig. 2, Fig. 3, head summary)")
    s.add_argument("--maps", required=True)
    s.add_argument("--layers", type=_ints, default=[0], help="layers for CLS-row maps (0-based), e.g. 0,1")
    s.add_argument("--pairs", type=_pair, nargs="+", default=None, help="LAYER,HEAD pairs for full maps")
    s.add_argument("--out", default="eamvit-plots")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("train-digits", help="train the demo ViT on scikit-learn's digits")
    s.add_argument("--out", default=str(ASSET))
    s.add_argument("--epochs", type=int, default=80)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_train_digits)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _validate_common(args)
        args.func(args)
    except EamError as e:
        print(f"eamvit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eamvit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
