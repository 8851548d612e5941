"""Options and helpers shared by every command group: model, data, entropy, freezing, pruning."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from eamvit.errors import EamError


def floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


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


def granularities(text: str) -> list[str]:
    from eamvit.methods.freeze import GRANULARITIES

    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in out if t not in GRANULARITIES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"expected granularities from {','.join(GRANULARITIES)}, got {text!r}")
    return out


def add_freeze_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    from eamvit.methods.freeze import AGGREGATES, GRANULARITIES, SCOPES, SELECTIONS, VALUE_QUANTIZERS

    g = p.add_argument_group("freezing")
    if sweep:
        g.add_argument("--granularity", type=granularities, default=["entry"],
                       help="what is frozen, comma-separated: entry (the paper), row (a query token's row, all "
                            "heads; ViT only), head (a whole head); rows/heads skip their work (default entry)")
    else:
        g.add_argument("--granularity", choices=GRANULARITIES, default="entry",
                       help="what is frozen: entry (the paper), row (a query token's row, all heads; ViT only), "
                            "head (a whole head); rows and heads skip their work (default entry)")
    g.add_argument("--aggregate", choices=AGGREGATES, default="mean",
                   help="how a row's or head's entry entropies rank it (default mean)")
    if sweep:
        g.add_argument("--taus", type=floats, default=[round(0.1 * i, 1) for i in range(10)],
                       help="sparsity levels, e.g. 0,0.1,0.2 (default 0..0.9)")
        g.add_argument("--scopes", nargs="+", choices=SCOPES, default=["head"])
        g.add_argument("--seeds", type=int, default=3, help="random-freezing seeds averaged per point")
    else:
        g.add_argument("--tau", type=float, default=0.0, help="fraction of attention entries to freeze, [0, 1]")
        g.add_argument("--frozen", default=None,
                       help="frozen attention saved by `eamvit finetune --maps ... --tau ...` (frozen.safetensors)")
        g.add_argument("--scope", choices=SCOPES, default=None,
                       help="where the τ fraction is taken (default: head for entries, layer for rows and heads)")
        g.add_argument("--selection", choices=SELECTIONS, default="entropy")
    g.add_argument("--value-bits", type=int, default=None, help="precision of frozen values (default fp32)")
    g.add_argument("--value-quantizer", choices=VALUE_QUANTIZERS, default="uniform")


def alpha_arg(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity", "∞"):
        return float("inf")
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a Rényi order such as 0.5, 2 or inf, got {text!r}") from None


def add_prune_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """Token-pruning options (eamvit.methods.prune); ``sweep`` adds the κ × method grid of ``sweep --prune``."""
    from eamvit.methods.prune import KEYS, METHODS, PLACEMENTS

    g = p.add_argument_group("token pruning")
    if sweep:
        g.add_argument("--prune", action="store_true", help="sweep token pruning (keep rate x method) instead of freezing")
        g.add_argument("--keep-rates", type=floats, default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
                       help="keep rates, e.g. 0.9,0.7,0.5 (default 0.9..0.3)")
        g.add_argument("--methods", default="shannon,renyi:0.5,renyi:2,renyi:3,renyi:inf,evit,random",
                       help="methods, renyi:ORDER for Rényi (default: all of the seed's)")
        g.add_argument("--no-throughput", action="store_true", help="skip the images/s measurement")
        g.add_argument("--throughput-batch", type=int, default=32, help="images per timed forward")
    else:
        g.add_argument("--prune", choices=METHODS, default=None, help="prune patch tokens with this score")
        g.add_argument("--keep-rate", type=float, default=0.7, help="keep rate κ in (0, 1]")
        g.add_argument("--alpha", type=alpha_arg, default=2.0, help="Rényi order for --prune renyi (0, 0.5, 2, inf...)")
    g.add_argument("--prune-blocks", type=ints, default=None,
                   help="0-based pruning blocks (default: 3,6,9 of 12, scaled to the depth)")
    g.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse dropped tokens into one (default: on for EViT only)")
    g.add_argument("--placement", choices=PLACEMENTS, default="attn",
                   help="prune after the attention residual (attn, EViT) or after the whole block")
    g.add_argument("--entropy-keys", choices=KEYS, default="all",
                   help="entropy of the whole attention row (all) or of its patch keys renormalised (patches)")


def prune_options(args) -> dict:
    return {"blocks": args.prune_blocks, "fuse": args.fuse, "placement": args.placement, "keys": args.entropy_keys}


def parse_device(name: str):
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


def init_distributed(device) -> None:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    import torch
    import torch.distributed as dist

    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    from eamvit.methods.calibrate import dist_info

    return dist_info()[0] == 0


def load_model(args):
    """The model the arguments name (the bundled digits ViT when none is named)."""
    from eamvit.experiments.digits import load_demo_model
    from eamvit.methods.models import create_model

    device = parse_device(args.device)
    init_distributed(device)
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
    from eamvit.methods.data import build_dataset, random_subset
    from eamvit.methods.models import data_config

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
    from eamvit.methods.calibrate import EntropyMaps, compute_entropy_maps, parse_bytes

    if args.maps:
        maps = EntropyMaps.load(args.maps)
        maps.check_model(model, source=f"maps {args.maps}")
        return maps
    maps = compute_entropy_maps(model, cal, indices=cal_idx, bits=args.bits, batch_size=args.batch_size,
                                workers=args.workers, device=device,
                                max_memory=parse_bytes(args.max_memory) if args.max_memory else None,
                                meta={"transforms": jsonable(cfg), "seed": args.seed})
    if out_dir is not None and is_main():
        maps.save(out_dir / "maps.safetensors")
    return maps


def jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def validate_common(args) -> None:
    from eamvit.ops.entropy import check_bits
    from eamvit.methods.freeze import FreezeConfig

    if hasattr(args, "bits"):
        check_bits(args.bits)
    if hasattr(args, "tau"):
        FreezeConfig(tau=args.tau, scope=args.scope, selection=args.selection, value_bits=args.value_bits,
                     value_quantizer=args.value_quantizer, granularity=args.granularity,
                     aggregate=args.aggregate).validate()
    if hasattr(args, "taus"):
        for t in args.taus:
            FreezeConfig(tau=t, value_bits=args.value_bits).validate()
        if args.seeds < 1:
            raise EamError("--seeds must be at least 1")
    from eamvit.cli.quant import validate_quant_args

    validate_quant_args(args)
    for name in ("batch_size", "num_samples", "calib_size"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise EamError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
