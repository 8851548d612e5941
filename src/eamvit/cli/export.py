"""``export`` (a deployable ONNX model) and ``eval --onnx`` (evaluating one in ONNX Runtime)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from eamvit.errors import EamError
from eamvit.cli.common import (format_row, add_data_args, add_entropy_args, add_freeze_args, add_model_args, add_prune_args,
                               build_data, get_maps, is_main, load_model, prune_options, require_modules)
from eamvit.cli.quant import add_quant_args, apply_quant, needs_quant_calib, value_deltas, wants_quant


def export_config(args: argparse.Namespace):
    """The :class:`~eamvit.methods.export.ExportConfig` the arguments ask for (validated)."""
    from eamvit.methods.export import ExportConfig

    return ExportConfig(scheme=args.scheme, softmax=args.softmax, symmetric_activations=args.symmetric_activations,
                        symmetric_weights=args.symmetric_weights, block_size=args.block_size,
                        kept_tokens=args.kept_tokens, opset=args.opset).validate()


def _check_out(out: Path) -> None:
    from eamvit.io import ensure_writable_dir

    if out.is_dir():
        raise EamError(f"--out {out} is a folder; give the .onnx file to write")
    ensure_writable_dir(out.parent if str(out.parent) else ".")


def _compress(args: argparse.Namespace, model, device, cal, cal_idx, cfg) -> dict[str, Any]:
    """Quantize, freeze and prune ``model`` in place as the arguments say, in ``eval``'s order."""
    from eamvit.methods.freeze import FreezeConfig, freeze_

    extra: dict[str, Any] = {}
    if wants_quant(args):
        extra.update(apply_quant(args, model, cal, cal_idx))
    if args.tau > 0 or args.maps:
        maps = get_maps(args, model, device, cal, cal_idx, cfg)
        freeze_(model, maps, FreezeConfig(tau=args.tau, scope=args.scope, selection=args.selection, seed=args.seed,
                                          value_bits=args.value_bits, value_quantizer=args.value_quantizer),
                value_deltas=value_deltas(model, args.value_quantizer))
        extra["tau"] = args.tau
    if args.prune:
        from eamvit.methods.prune import PruneConfig, prune_

        rep = prune_(model, PruneConfig(method=args.prune, keep_rate=args.keep_rate, alpha=args.alpha,
                                        **prune_options(args)))
        extra.update(prune=args.prune, keep_rate=args.keep_rate, tokens="-".join(map(str, rep.tokens_per_stage)))
    return extra


def cmd_export(args: argparse.Namespace) -> None:
    require_modules("eamvit export")
    from eamvit.methods.export import FORMATS, export_onnx

    if args.format not in FORMATS:
        raise EamError(f"unknown export format {args.format!r}; eamvit exports {', '.join(FORMATS)}")
    if getattr(args, "quant", None) not in (None, "repq"):
        raise EamError(f"--quant {args.quant} has no integer-runtime form; export RepQ-ViT models (--quant repq)")
    out = Path(args.out)
    _check_out(out)
    config = export_config(args)
    model, device = load_model(args)
    need_calib = (args.tau > 0 and not args.maps) or needs_quant_calib(args)
    _, _, cal, cal_idx, cfg = build_data(args, model, need_calib=need_calib)
    extra = _compress(args, model, device, cal, cal_idx, cfg)
    if is_main():
        rep = export_onnx(model, out, config)
        what = ", ".join(f"{k}={v}" for k, v in extra.items())
        print(f"wrote {out}: {rep.kind}{', ' + what if what else ''}, {rep.bytes:,} bytes; "
              f"evaluate it with `eamvit eval --onnx {out}`")


# Options that build a model; an ONNX file already is one.
_MODEL_OPTIONS = ("model", "checkpoint", "quant", "quant_state", "prune", "maps")


def _onnx_data_args(args: argparse.Namespace, meta: dict) -> None:
    """Preprocessing recorded at export, unless the command line overrides it."""
    stored = meta.get("data_config", {})
    for key in ("crop_pct", "crop_mode", "mean", "std", "interpolation"):
        if getattr(args, key, None) is None and stored.get(key) is not None:
            setattr(args, key, stored[key])
    size = stored.get("input_size", [None])[-1]
    if args.img_size is not None and size is not None and args.img_size != size:
        raise EamError(f"--img-size {args.img_size} does not fit {args.onnx}, exported for {size} px images")


def cmd_eval_onnx(args: argparse.Namespace) -> None:
    """``eamvit eval --onnx FILE``: the exported model through ONNX Runtime, with eval's data and rows."""
    require_modules("eamvit eval --onnx")
    from eamvit.io import ensure_writable_dir, write_results
    from eamvit.methods.evaluate import evaluate, result_row
    from eamvit.cli.common import warn
    from eamvit.methods.export_runtime import OnnxClassifier, read_onnx_meta, saturation_warning
    from eamvit.methods.models import ModelSpec, create_model

    given = [o for o in _MODEL_OPTIONS if getattr(args, o, None)] + (["tau"] if args.tau > 0 else [])
    if given:
        raise EamError(f"--onnx holds the whole model; drop --{given[0].replace('_', '-')}")
    out = Path(args.out) if args.out else None
    if out:
        ensure_writable_dir(out.parent if str(out.parent) else ".")
    meta = read_onnx_meta(args.onnx)
    _onnx_data_args(args, meta)
    spec = ModelSpec(**meta["model"])
    # An untrained skeleton of the exported architecture gives eval's data config and row fields.
    skeleton = create_model(spec.name, model_kwargs=spec.model_kwargs)
    skeleton.eam_spec = spec
    ev, ev_idx, _, _, cfg = build_data(args, skeleton, need_calib=bool(meta.get("quant")) and args.data != "digits")
    model = OnnxClassifier(args.onnx, threads=args.threads)
    if saturation_warning(meta):
        warn(saturation_warning(meta))
    m = evaluate(model, ev, ev_idx, batch_size=args.batch_size, workers=args.workers, device="cpu")
    row = result_row(skeleton, m, cfg, **_onnx_row_fields(meta, args.onnx))
    row["param_count"] = meta.get("param_count", row["param_count"])
    if is_main():
        print(format_row(row))
        if out:
            csv_path, _ = write_results(out, [row])
            print(f"wrote {csv_path} and {csv_path.with_suffix('.json')}")


def _onnx_row_fields(meta: dict, path: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"onnx": str(path), "export": meta["export"].get("scheme") if meta.get("quant") else "fp32"}
    q, p = meta.get("quant"), meta.get("prune")
    if q:
        extra.update(quant="repq", w_bits=q.get("w_bits"), a_bits=8 if extra["export"] == "qdq" else 32)
    if p:
        extra.update(prune=p.get("method"), keep_rate=p.get("keep_rate"))
    if meta.get("frozen_layers"):
        extra["frozen_layers"] = len(meta["frozen_layers"])
    return extra


def add_eval_onnx_args(p: argparse.ArgumentParser) -> None:
    """``--onnx`` and ``--threads`` on ``eval``."""
    g = p.add_argument_group("ONNX Runtime")
    g.add_argument("--onnx", default=None, help="evaluate this exported model (`eamvit export`) in ONNX Runtime "
                   "on CPU instead of a PyTorch model (default: none, the PyTorch model)")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: one per core)")


def register(sub) -> None:
    """Add this group's sub-commands to the ``eamvit`` parser."""
    s = sub.add_parser("export", help="write a deployable ONNX model: fp32, pruned, frozen, RepQ-ViT int8 (QDQ) "
                       "or low-bit weight-only")
    add_model_args(s)
    add_data_args(s)
    add_entropy_args(s)
    add_freeze_args(s)
    add_prune_args(s)
    add_quant_args(s, "eval")
    s.set_defaults(w_bits=8, a_bits=8)  # the QDQ form is 8-bit; weight-only takes --w-bits 4
    for action in s._actions:
        if action.dest in ("w_bits", "a_bits"):
            action.help = action.help.replace("default 4", "default 8 for export")
    g = s.add_argument_group("export")
    g.add_argument("--format", default="onnx", help="file format (onnx)")
    g.add_argument("--out", required=True, help="file to write, e.g. model.onnx")
    g.add_argument("--scheme", default="qdq", help="quantized models: qdq (int8 QuantizeLinear/DequantizeLinear, "
                   "default) or weight-only (ONNX Runtime MatMulNBits weights, float activations)")
    g.add_argument("--softmax", default="uniform", help="the log√2 post-softmax quantizer has no QDQ form: export "
                   "it as 8-bit uniform on [0, Δ] (uniform, default) or unquantized (fp32)")
    g.add_argument("--symmetric-activations", action="store_true",
                   help="int8 activations with zero point 0 (TensorRT); default uint8 asymmetric")
    g.add_argument("--symmetric-weights", action="store_true",
                   help="symmetric per-channel weights (zero point 0); default RepQ-ViT's asymmetric ones")
    g.add_argument("--block-size", type=int, default=None, help="weight-only: MatMulNBits block (power of two "
                   "≥ 16); default the largest of 16..128 dividing each layer's input width")
    g.add_argument("--kept-tokens", action="store_true",
                   help="pruned models: also output each pruning stage's kept patch indices (kept_0, ...)")
    g.add_argument("--opset", type=int, default=17, help="ONNX opset (13..21, default 17)")
    s.set_defaults(func=cmd_export)
