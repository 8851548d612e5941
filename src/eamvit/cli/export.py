"""``export`` (a deployable ONNX model) and ``eval --onnx`` (evaluating one in ONNX Runtime or OpenVINO)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from eamvit.methods.state import state_of, step_config
from eamvit.errors import EamError
from eamvit.io import check_output_file, ensure_writable_dir, output_lock
from eamvit.cli.common import data_overrides, data_splits, is_main, load_model, print_row, require_modules, warn
from eamvit.cli.options import FREEZE_OPTIONS, MERGE_OPTIONS, PRUNE_OPTIONS, TARGET_OPTIONS, refuse_given, set_help
from eamvit.cli.recipe import add_stack_args, apply_args, needs_calibration, recipe_from_args, summary


def _target_config(target, args: argparse.Namespace) -> Any:
    """The export config of a model quantized for ``target``, refused where the export would not be the model
    `eval` scores."""
    if target is None:
        raise EamError("the quantized model names no deployment target (a state of eamvit 0.3 or of the Python API "
                       "without one): its export would be another model than `eval` scores; quantize it again for "
                       "its target, e.g. `eamvit quantize --target qdq` or `eamvit compress --target weight-only`")
    return target.export_config(block_size=args.block_size, kept_tokens=args.kept_tokens, opset=args.opset,
                                weight_storage=args.weight_storage)


def _quant_state(args: argparse.Namespace) -> tuple[Any, Any]:
    """The quantization config and the deployment target of ``--quant-state`` (``None`` where none)."""
    if not getattr(args, "quant_state", None):
        return None, None
    from eamvit.methods.export import Target
    from eamvit.methods.quantize import config_type, read_quantized

    meta = read_quantized(args.quant_state)[0]
    target = Target.from_dict(meta["target"]) if meta.get("target") is not None else None
    return config_type(meta.get("method")).from_dict(meta.get("config", {})), target


def refuse_inapplicable_export(args: argparse.Namespace, quantized: bool, calibrated=None) -> None:
    """Refuse export options the export cannot use (``calibrated``: the quantization calibrated now, if any)."""
    if not quantized:
        refuse_given(args, [*TARGET_OPTIONS, "block_size", "weight_storage"],
                     "without --quant, --quant-state or a quantized --state/--recipe "
                     "(an unquantized model is exported in fp32)")
    elif args.target == "weight-only":
        refuse_given(args, ["a_bits", "softmax", "symmetric_activations"],
                     "to --target weight-only (its activations stay float)")
    else:
        refuse_given(args, ["block_size"], f"to --target {args.target or 'qdq'} (MatMulNBits blocks are weight-only's)")
        if calibrated is not None and calibrated.a_bits != 8 and args.target != "torch":
            raise EamError(f"--target {args.target or 'qdq'} exports 8-bit activations, not --a-bits "
                           f"{calibrated.a_bits}; use --a-bits 8, or --target weight-only (float activations)")


def cmd_export(args: argparse.Namespace) -> None:
    require_modules("eamvit export")
    from eamvit.methods.export import FORMATS, ExportConfig, export_onnx

    if args.format not in FORMATS:
        raise EamError(f"unknown export format {args.format!r}; eamvit exports {', '.join(FORMATS)}")
    out = Path(args.out)
    if out.is_dir():
        raise EamError(f"--out {out} is a folder; give the .onnx file to write")
    check_output_file(out)  # creates nothing: the lock creates its folder
    recipe = recipe_from_args(args)
    stored, stored_target = _quant_state(args)
    quant = recipe.step("quant") or stored
    if quant is not None and quant.KIND != "repq":
        where = f"--quant {quant.KIND}" if getattr(args, "quant", None) else f"the {quant.KIND} quantization step"
        raise EamError(f"{where} has no integer-runtime form; export RepQ-ViT models (--quant repq)")
    refuse_inapplicable_export(args, quant is not None, recipe.step("quant"))
    if quant is not None:  # refused before anything is loaded or written: the target the file will hold
        _target_config(recipe.target if recipe.step("quant") is not None else stored_target, args)
    with output_lock(out):
        model, device = load_model(args)
        # Held out of --data as `eval` holds it out; the model records them, and the export carries them.
        sp = data_splits(args, model, need_calib=needs_calibration(args, recipe), scores=False)
        _, extra = apply_args(args, model, device, sp)
        config = (ExportConfig(block_size=args.block_size, kept_tokens=args.kept_tokens, opset=args.opset)
                  if step_config(model, "quant") is None else _target_config(state_of(model).target, args))
        if is_main():
            rep = export_onnx(model, out, config)
            what = summary(extra)
            print(f"wrote {out}: {rep.kind}{', ' + what if what else ''}, {rep.bytes:,} bytes; "
                  f"evaluate it with `eamvit eval --onnx {out}`")


# Options that build a model; an ONNX file already is one.
_MODEL_OPTIONS = ("model", "model_kwargs", "pretrained", "checkpoint", "quant", "quant_state", "frozen", "state",
                  "recipe", *PRUNE_OPTIONS, *FREEZE_OPTIONS, *MERGE_OPTIONS)
EVAL_RUNTIMES = ("onnxruntime", "openvino")


def _onnx_data_args(args: argparse.Namespace, meta: dict) -> bool:
    """Fill in the preprocessing recorded at export where the command line gives none; returns whether the
    recorded preprocessing is used as it is (no preprocessing option given)."""
    from eamvit.methods.data import exported_preprocessing

    given, stored = data_overrides(args), meta.get("data_config", {})
    for key, value in exported_preprocessing(stored, given, args.data, args.onnx).items():
        setattr(args, key, value)  # after the refusals: nothing checks these as given
    return bool(stored) and not any(v is not None for v in given.values())


def _eval_runtime(args: argparse.Namespace) -> str:
    """The runtime ``--runtime`` names for ``--onnx`` (refused, before any work, where it cannot run the file)."""
    from eamvit.methods.export_openvino import require_openvino

    runtime = args.runtime or "onnxruntime"
    if runtime not in EVAL_RUNTIMES:
        raise EamError(f"--runtime {runtime} is not one of {', '.join(EVAL_RUNTIMES)}")
    if runtime == "openvino":
        require_openvino("eamvit eval --runtime openvino")
    elif Path(args.onnx).suffix == ".xml":
        raise EamError(f"{args.onnx} is an OpenVINO model; evaluate it with --runtime openvino")
    return runtime


def cmd_eval_onnx(args: argparse.Namespace) -> None:
    """``eamvit eval --onnx FILE``: the exported model through ONNX Runtime or OpenVINO, with eval's data and rows."""
    require_modules("eamvit eval --onnx")
    from eamvit.methods.evaluate import evaluate, result_row
    from eamvit.methods.export_openvino import OpenVinoClassifier, read_model_meta
    from eamvit.methods.export_runtime import OnnxClassifier, saturation_warning
    from eamvit.methods.models import ModelSpec, create_model

    refuse_given(args, _MODEL_OPTIONS, "with --onnx, which holds the whole model")
    runtime = _eval_runtime(args)
    if args.out:
        ensure_writable_dir(Path(args.out).parent if str(Path(args.out).parent) else ".")
    meta = read_model_meta(args.onnx)
    recorded = _onnx_data_args(args, meta)
    spec = ModelSpec(**meta["model"])
    # An untrained skeleton of the exported architecture gives eval's data config and row fields.
    skeleton = create_model(spec.name, model_kwargs=spec.model_kwargs)
    state_of(skeleton).spec = spec
    # The file calibrates nothing now; the images that calibrated it (recorded at export) are not scored.
    sp = data_splits(args, skeleton, need_calib=False, calibrated_on=[(str(args.onnx), meta.get("calibration"))])
    cfg = {**sp.data_config, "source": "onnx export"} if recorded else sp.data_config  # not the user's overrides
    model = (OpenVinoClassifier if runtime == "openvino" else OnnxClassifier)(args.onnx, threads=args.threads)
    _check_input_size(model, cfg, args.onnx)
    if runtime == "onnxruntime" and saturation_warning(meta):
        warn(saturation_warning(meta))
    m = evaluate(model, sp.eval_set, sp.eval_indices, batch_size=args.batch_size, workers=args.workers, device="cpu")
    row = result_row(skeleton, m, cfg, **_onnx_row_fields(meta, args.onnx, skeleton),
                     runtime="OpenVINO" if runtime == "openvino" else "ONNX Runtime")
    row["param_count"] = meta.get("param_count", row["param_count"])
    row["calib_excluded"] = sp.calib_excluded
    print_row(row, args.out)


def _check_input_size(model, cfg: dict, path: str) -> None:
    """Refuse images of another size than the graph takes, which the runtime would fail on mid-run."""
    graph = list(model.input_dims)
    want = [int(v) for v in cfg["input_size"]]
    if len(graph) != len(want) or any(isinstance(g, int) and g != w for g, w in zip(graph, want)):
        show = lambda dims: "x".join(str(d) for d in dims)  # noqa: E731
        raise EamError(f"{path} takes {show(graph)} images but its eamvit metadata and the data options give "
                       f"{show(want)}; export it again with `eamvit export`")


def _onnx_row_fields(meta: dict, path: str, skeleton) -> dict[str, Any]:
    from eamvit.experiments.prune_sweep import merged_fields
    from eamvit.methods.merge import MergeConfig, merge_
    from eamvit.methods.prune import setting_text

    extra: dict[str, Any] = {"onnx": str(path), "export": meta["export"].get("scheme") if meta.get("quant") else "fp32"}
    q, p, m = meta.get("quant"), meta.get("prune"), meta.get("merge")
    if q and q.get("method") == "nncf":
        extra.update(quant="nncf", w_bits=8, a_bits=8)
    elif q:
        extra.update(quant="repq", w_bits=q.get("w_bits"), a_bits=8 if extra["export"] == "qdq" else 32)
    if p:
        extra.update(prune=p.get("method"), keep_rate=setting_text(p["keep_rate"]))
    if m:  # what the file merges, read off the skeleton merging alike (the graph's shapes are the skeleton's)
        merge_(skeleton, MergeConfig.from_dict(m))
        extra.update(merged_fields(skeleton))
    if meta.get("frozen_layers"):
        extra["frozen_layers"] = len(meta["frozen_layers"])
    return extra


def add_eval_onnx_args(p: argparse.ArgumentParser) -> None:
    """``--onnx``, ``--runtime`` and ``--threads`` on ``eval``."""
    g = p.add_argument_group("exported models")
    g.add_argument("--onnx", default=None, help="evaluate this exported model (`eamvit export`, or an OpenVINO "
                   ".xml) on CPU instead of a PyTorch model (default: none, the PyTorch model)")
    g.add_argument("--runtime", default=None,
                   help='what runs --onnx: onnxruntime (default) or openvino (pip install "eamvit[openvino]")')
    g.add_argument("--threads", type=int, default=None, help="the runtime's threads (default: one per core)")


def register(sub) -> None:
    """Add this group's sub-commands to the ``eamvit`` parser."""
    s = sub.add_parser("export", help="write a deployable ONNX model: fp32, pruned, merged, frozen, RepQ-ViT int8 "
                       "(QDQ) or low-bit weight-only")
    add_stack_args(s)
    set_help(s, w_bits="weight bits, 2..8 (default 8 for export)",
             a_bits="activation bits, 2..8 (default 8 for export)")
    g = s.add_argument_group("export")
    g.add_argument("--format", default="onnx", help="file format (onnx)")
    g.add_argument("--out", required=True, help="file to write, e.g. model.onnx")
    g.add_argument("--block-size", type=int, default=None, help="weight-only: MatMulNBits block (power of two "
                   "≥ 16); default the largest of 16..128 dividing each layer's input width")
    g.add_argument("--weight-storage", default=None, choices=("int8", "uint8"),
                   help="target qdq: int8 weights, or uint8 ones with the zero point moved by 128 (the same numbers), "
                   "which ONNX Runtime multiplies exactly on x86 CPUs without VNNI, where its u8·s8 kernels saturate "
                   "(default: uint8 where this CPU lacks VNNI, else int8)")
    g.add_argument("--kept-tokens", action="store_true",
                   help="pruned models: also output each pruning stage's kept patch indices (kept_0, ...)")
    g.add_argument("--opset", type=int, default=None, help="ONNX opset (13..21); default 17, or the lowest the "
                   "model needs (18: VOLO's outlook attention, NaFlexViT at another grid than its position table's)")
    s.set_defaults(func=cmd_export)
