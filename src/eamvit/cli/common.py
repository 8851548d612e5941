"""Helpers shared by the commands: the model, the data split, maps, warnings and input checks."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from eamvit.methods.state import state_of
from eamvit.errors import EamError
from eamvit.io import write_results
from eamvit.cli.options import FREEZE_OPTIONS, given_values, parse_model_kwargs, refuse_given


def parse_device(name: str):
    """``--device`` as a torch device that exists on this machine, else one EamError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise EamError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        raise EamError(f"device {name} is not available on this machine; use --device cpu"
                       + (" or cuda" if available["cuda"] else ""))
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise EamError(f"device {name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def is_main() -> bool:
    """Whether this is the process that prints and writes (rank 0, or no torchrun)."""
    from eamvit.methods.calibrate import dist_info

    return dist_info()[0] == 0


def load_model(args):
    """The model the arguments name (the bundled digits ViT when none is named), after joining the process
    group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    import torch
    import torch.distributed as dist

    from eamvit.methods.models import BUNDLED_MODEL, create_model, model_spec

    device = parse_device(args.device)
    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.model is None and (args.pretrained or kwargs):
        raise EamError("--pretrained/--model-kwargs need --model NAME")
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    model = create_model(args.model or BUNDLED_MODEL, pretrained=bool(args.pretrained), checkpoint=args.checkpoint,
                         model_kwargs=kwargs, device=device)
    if model_spec(model).weights == "random":
        warn(f"{args.model} has random weights (no --checkpoint, no --pretrained); its results are meaningless "
             "and change from run to run")
    require_verbs(args, model)
    return model, device


def require_verbs(args, model) -> None:
    """Refuse, before any data is read, an attention verb (:data:`eamvit.modules.adapters.VERBS`) the command
    line asks of the model that its attention family does not support."""
    from eamvit.modules.attention import attention_layers, require

    command = getattr(args, "command", None)
    freezing = (getattr(args, "tau", 0) or getattr(args, "taus", None) or getattr(args, "maps", None)
                or command == "calibrate")
    verbs = ["maps"] if freezing else []
    if freezing and command != "calibrate":
        granularity = getattr(args, "granularity", None) or "entry"
        verbs += list(granularity) if isinstance(granularity, (list, tuple)) else [granularity]
    verbs += [args.quant] if getattr(args, "quant", None) else []
    verbs += [verb for verb in ("prune", "merge") if getattr(args, verb, None)]
    verbs += ["export"] if command == "export" else []
    layers = attention_layers(model)
    for verb in verbs:
        require(layers, verb)


def require_modules(command: str) -> None:
    """One EamError naming the install command when ONNX or ONNX Runtime, which ``command`` needs, cannot be imported.

    Called first, so that a broken install fails before minutes of work, not with a traceback later; the
    modules are imported, so one present but failing to load (a missing shared library) is reported too.
    """
    import importlib

    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        them = "them" if len(missing) > 1 else "it"
        raise EamError(f"{command} needs {', '.join(missing)}, which cannot be imported; install {them} with "
                       f"`pip install {' '.join(missing)}` (or reinstall eamvit, which depends on {them})")


_WARNINGS: list[str] = []


def warn(message: str) -> None:
    """Queue a warning line for :func:`flush_warnings`, which each command calls once its inputs are checked,
    so that a command failing on its inputs still prints exactly one line, its error."""
    if message not in _WARNINGS:
        _WARNINGS.append(message)


def flush_warnings(show: bool = True) -> None:
    """Print (``show``) and forget the queued warnings."""
    for message in _WARNINGS:
        if show and is_main():
            print(f"eamvit: warning: {message}", file=sys.stderr)
    _WARNINGS.clear()


def data_overrides(args) -> dict:
    """The preprocessing options the user gave (``None`` where not given)."""
    return {"img_size": args.img_size, "crop_pct": args.crop_pct, "crop_mode": args.crop_mode, "mean": args.mean,
            "std": args.std, "interpolation": args.interpolation}


def data_splits(args, model, need_calib: bool, maps=None, evaluate: bool = True,
                calibrated_on: Sequence[tuple[str, Optional[list]]] = (), calib_all: bool = False,
                scores: bool = True):
    """The command's :class:`~eamvit.methods.data.Splits` by the one rule of
    :func:`eamvit.methods.data.build_splits`; prints what calibration used and what scoring skips.

    Args:
        need_calib: the command calibrates something now.
        maps: loaded ``--maps``: their data config is used when no preprocessing option is given, and
            the images that calibrated them are not scored.
        evaluate: the command scores images of ``--data``.
        calibrated_on: ``(name, records)`` of other artifacts evaluated (``--quant-state`` is read here).
        calib_all: calibrate on all of the calibration images by default (``calibrate``).
        scores: the command scores the evaluation set (else, as ``quantize`` and ``export``, it only
            holds calibration images out of ``--data`` as ``eval`` would).
    """
    from eamvit.methods.data import build_splits, choose_data_config

    ov = data_overrides(args)
    saved, recorded = _artifacts(args, maps)
    cfg = choose_data_config(model, args.data, ov, saved)
    if not scores:  # only the held-out rule matters (as eval would apply it): nothing scored, nothing to skip
        recorded, calibrated_on = [], ()
        evaluate = evaluate and not getattr(args, "calib_data", None)
    if args.data != "digits":  # what a state or checkpoint saved from this model must carry
        state_of(model).data_config = cfg
    sp = build_splits(args.data, cfg, overrides={k: v for k, v in ov.items() if v is not None},
                      calib_data=getattr(args, "calib_data", None), num_samples=args.num_samples,
                      calib_size=getattr(args, "calib_size", None), seed=args.seed, evaluate=evaluate,
                      calibrate=need_calib, strict_images=args.strict_images, calib_all=calib_all,
                      calib_need=_calib_need(args),
                      calibrated_on=[*recorded, *calibrated_on])
    for name in sp.unrecorded if scores else ():
        warn(f"{name} does not record the images that calibrated it (written by an older eamvit): "
             "some of them may be scored; create it again to have them skipped")
    if is_main():
        for line in [sp.calib_note, *(sp.skip_notes if scores else ())]:
            if line:
                print(f"eamvit: {line}", file=sys.stderr)
    if scores:
        warn_class_mismatch(sp.eval_set, model, args.data)
    return sp


def warn_class_mismatch(dataset, model, name: str) -> None:
    """Warn when ``dataset``'s class folders cannot be ``model``'s classes (see ``class_mismatch``)."""
    from eamvit.methods.data import class_mismatch

    message = class_mismatch(dataset, int(getattr(model, "num_classes", 0) or 0), name)
    if message:
        warn(message)


def _calib_need(args) -> int:
    """Calibration images the quantization methods of the command read (``--quant``, compare's ``--methods``)."""
    from eamvit.methods.quantize import calibration_need

    methods = [getattr(args, "quant", None), *str(getattr(args, "methods", "") or "").split(",")]
    return calibration_need(methods, getattr(args, "adfq_calib_size", None))


def _artifacts(args, maps) -> tuple[Optional[tuple[str, str, Any]], list[tuple[str, Optional[list]]]]:
    """``(kind, file, data config)`` of the maps or state the command reads whose preprocessing applies
    (:func:`~eamvit.methods.data.choose_data_config`), and ``(file, calibration records)`` of each."""
    from eamvit.methods.quantize import read_quantized
    from eamvit.methods.recipe import read_compressed

    recorded, saved = [], None
    for dest, kind, read in (("state", "compressed model", read_compressed),
                             ("quant_state", "quantized state", read_quantized)):
        path = getattr(args, dest, None)
        if path:
            meta = read(path)[0]
            saved = kind, f"{kind} {path}", meta.get("data_config")
            recorded.append((str(path), meta.get("calibration")))
    if maps is not None:
        if maps.meta.get("transforms"):  # the maps' preprocessing wins over a quantized state's
            saved = "maps", f"entropy maps {args.maps}", maps.meta["transforms"]
        recorded.append((str(args.maps), maps.meta.get("calibration")))
    return saved, recorded


def load_maps(args, model):
    """The ``--maps`` file, checked against the model (``None`` without ``--maps``)."""
    from eamvit.methods.calibrate import EntropyMaps

    if not getattr(args, "maps", None):
        return None
    maps = EntropyMaps.load(args.maps)
    maps.check_model(model, source=f"maps {args.maps}")
    return maps


def get_maps(args, model, device, sp, out_dir: Optional[Path] = None, maps=None):
    """``maps``, else ``--maps``, else maps computed now on ``sp``'s calibration images (saved in ``out_dir``)."""
    maps = maps if maps is not None else load_maps(args, model)
    if maps is not None:
        return maps
    maps = compute_maps(args, model, device, sp)
    if out_dir is not None and is_main():
        maps.save(out_dir / "maps.safetensors")
    return maps


def compute_maps(args, model, device, sp, meta: Optional[dict] = None, **options):
    """Entropy maps of ``model`` on ``sp``'s calibration images by the entropy options (``options``: more
    :class:`~eamvit.methods.calibrate.CalibOptions` fields)."""
    from eamvit.methods.calibrate import CalibOptions, compute_entropy_maps, parse_bytes

    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in sp.data_config.items()}  # as JSON keeps it
    return compute_entropy_maps(model, sp.calib_set, indices=sp.calib_indices, **given_values(bits=args.bits),
                                batch_size=args.batch_size, options=CalibOptions(
                                    workers=args.workers, device=device,
                                    max_memory=parse_bytes(args.max_memory) if args.max_memory else None,
                                    meta={"transforms": cfg, "seed": args.seed, **(meta or {})}, **options))


def flag(args, dest: str) -> str:
    """The option the user gave for ``dest``: ``--state`` when it named the file (see ``resolve_state``)."""
    return getattr(args, "flags", {}).get(dest) or "--" + dest.replace("_", "-")


# Least values of counts and sizes (a median and quartiles take 3 timed repetitions).
_LEAST = {"threads": 1, "throughput_reps": 3, "throughput_batch": 1, "seeds": 1, "batch_size": 1, "num_samples": 1,
          "calib_size": 1, "workers": 0, "img_size": 1}


def validate_common(args) -> None:
    """Check, before anything is loaded, the options every command shares."""
    from eamvit.ops.entropy import check_bits
    from eamvit.methods.calibrate import parse_bytes
    from eamvit.methods.freeze import FreezeConfig

    if getattr(args, "bits", None) is not None:
        check_bits(args.bits)
    if getattr(args, "frozen", None):
        refuse_given(args, FREEZE_OPTIONS, f"with {flag(args, 'frozen')} {args.frozen}, which already holds the "
                     "frozen attention and its settings")
    if hasattr(args, "onnx") and not args.onnx:  # eval's --threads and --runtime are the exported model's
        refuse_given(args, ["threads", "runtime"], "without --onnx (they run an exported model; "
                     "export one with `eamvit export`)")
    if hasattr(args, "taus"):  # the sweeps build their freezing configs after loading the model: check τ first
        for t in args.taus:
            FreezeConfig(tau=t, value_bits=args.value_bits, **given_values(value_quantizer=args.value_quantizer))
    for name, least in _LEAST.items():
        v = getattr(args, name, None)
        if v is not None and v < least:
            raise EamError(f"--{name.replace('_', '-')} must be {f'at least {least}' if least else '0 or more'}, "
                           f"got {v}")
    if hasattr(args, "model_kwargs"):
        parse_model_kwargs(args.model_kwargs)
    crop = getattr(args, "crop_pct", None)
    if crop is not None and not 0 < crop <= 1:
        raise EamError(f"--crop-pct must be in (0, 1] (1 = no crop), got {crop}")
    if getattr(args, "std", None) is not None and any(not v > 0 for v in args.std):
        raise EamError(f"--std must be positive, got {args.std}")
    if getattr(args, "max_memory", None) is not None and parse_bytes(args.max_memory) < 1:
        raise EamError(f"--max-memory must be positive, got {args.max_memory}")
    if getattr(args, "device", None) is not None:
        parse_device(args.device)


def eval_data(args, sp, device, calib: bool = False):
    """The :class:`~eamvit.experiments.runner.EvalData` of ``sp``'s evaluation (``calib``: calibration) images."""
    from eamvit.experiments.runner import EvalData

    images = (sp.calib_set, sp.calib_indices) if calib else (sp.eval_set, sp.eval_indices)
    return EvalData(*images, batch_size=args.batch_size, workers=args.workers, device=device,
                    data_config=sp.data_config)


def print_row(row: dict, out: Optional[str] = None) -> None:
    """Print ``row`` as ``key=value`` pairs (list values comma-joined, so the line splits on spaces), and write
    it to ``out``.csv and ``out``.json where given."""
    if not is_main():
        return
    show = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v  # noqa: E731
    print(" ".join(f"{k}={show(v)}" for k, v in row.items()))
    if out:
        csv_path, json_path = write_results(out, [row])
        print(f"wrote {csv_path} and {json_path}")
