"""``eamvit optimize``: the fastest recipe of a model within a top-1 budget, each candidate measured as it would be
shipped, on this machine; a rerun resumes from ``points.jsonl``. Design: ``docs/architecture-experiments.md``,
"optimize".
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from eamvit.methods.state import state_of, step_config
from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.experiments.optimize_space import (Candidate, Runtime, Space, combinations, finetuned, merge_options,
                                               reference, single_candidates)
from eamvit.experiments.optimize_cache import CACHE, CACHE_VERSION, PointCache
from eamvit.experiments.optimize_report import CommandLines, point_rows, report_text, write_pareto
from eamvit.experiments.runner import Timing, measure_speedup, speedup_fields
from eamvit.experiments.size import model_size
from eamvit.experiments.timer import time_calls
from eamvit.io import atomic_path, ensure_writable_dir, tensors_sha256, write_text
from eamvit.methods.calibrate import CalibOptions, compute_entropy_maps
from eamvit.methods.data import Splits, calibration_record, readable_items
from eamvit.methods.evaluate import evaluate
from eamvit.methods.export import export_onnx
from eamvit.methods.export_openvino import OpenVinoClassifier, model_bytes, nncf_quantize, require_openvino
from eamvit.methods.export_runtime import OnnxClassifier, cpu_has_vnni
from eamvit.methods.finetune import FinetuneConfig, finetune
from eamvit.methods.models import (data_config, file_sha256, load_state_dict_strict, model_spec, read_checkpoint,
                                   save_checkpoint)
from eamvit.methods.prune import PruneConfig
from eamvit.methods.recipe import Recipe, apply_, restore_, save_compressed

NNCF_CALIB_SIZE = 300  # NNCF's own default subset size: what an OpenVINO user's nncf.quantize reads


@dataclass(frozen=True)
class OptimizeConfig(Config):
    """What ``eamvit optimize`` searches and how it measures.

    Args:
        max_drop: largest top-1 drop (percentage points) below the unmodified model a point may have.
        runtime: ``"onnxruntime"`` or ``"openvino"`` (the exported file in that runtime; OpenVINO needs the
            ``openvino`` extra) or ``"torch"`` (the PyTorch model).
        budget_minutes: stop starting new candidates after this long (``None``: search everything).
        space: ``"standard"`` or ``"small"`` (:mod:`~eamvit.experiments.optimize_space`).
        threads: ONNX Runtime's intra-op or OpenVINO's inference threads (``None``: one per core).
        reps: timed repetitions of each point and its reference.
        batch_size: images per evaluated and per timed call.
        seed: the run's seed (RepQ-ViT's calibration subset, random freezing).
        prunes: further pruning points searched after the space's (e.g. the per-block choice of
            ``sweep --prune --per-block``), as singles and in stacks.
        finetune: fine-tune every pruning or merging single that misses the budget after training, with its
            reduction applied, on the training images (:func:`optimize`'s ``train_set``), and search it again
            (``+ft``), alone and in stacks, which then quantize the fine-tuned weights (``None``: post-training
            points only). Its token counts, and so its speed, do not change; only its top-1 does.
    """

    max_drop: float = 1.0
    runtime: Runtime = "onnxruntime"
    budget_minutes: Optional[float] = None
    space: Space = "standard"
    threads: Optional[int] = None
    reps: int = 15
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    prunes: tuple[PruneConfig, ...] = ()
    finetune: Optional[FinetuneConfig] = None

    KIND = "optimize"
    VERSION = 1

    def _check(self) -> None:
        if not self.max_drop >= 0:
            raise EamError(f"--max-drop must be 0 or more percentage points of top-1, got {self.max_drop}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise EamError(f"--budget-minutes must be positive, got {self.budget_minutes}; leave it out to search "
                           "everything")
        if self.reps < 3:
            raise EamError(f"--reps must be at least 3 (a median and quartiles), got {self.reps}")
        if self.threads is not None and self.threads < 1:
            raise EamError(f"--threads must be at least 1, got {self.threads}")


@dataclass
class _Run:
    """What every candidate of one run is measured with."""

    model: nn.Module
    splits: Splits
    config: OptimizeConfig
    device: Any
    workdir: Path
    batch: torch.Tensor
    key_base: dict[str, Any]
    reference_call: Optional[Callable[[], Any]] = None
    maps: dict[str, Any] = field(default_factory=dict)
    nncf_images: Optional[torch.Tensor] = None
    nncf_calibration: list[dict[str, Any]] = field(default_factory=list)
    train_set: Optional[Dataset] = None
    train_record: dict[str, Any] = field(default_factory=dict)  # what a fine-tuned point's cache key names
    tuned: dict[str, Path] = field(default_factory=dict)  # fine-tuned weights, by _tuning_key

    @property
    def calib(self):
        sp = self.splits
        return Subset(sp.calib_set, list(sp.calib_indices)) if sp.calib_indices is not None else sp.calib_set


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _key_base(model: nn.Module, sp: Splits, config: OptimizeConfig) -> dict[str, Any]:
    """What every point's measurement depends on besides its candidate."""
    data = {"eval": calibration_record(sp.eval_set, sp.eval_indices),
            "calib": calibration_record(sp.calib_set, sp.calib_indices) if sp.calib_set is not None else None,
            "config": {k: v for k, v in sp.data_config.items() if k != "source"}}
    timing = {k: getattr(config, k) for k in ("runtime", "threads", "reps", "batch_size")}
    # VNNI decides the int8 kernels, their speed and the default weight storage: a point measured on a CPU
    # with it is another measurement than one without.
    timing["cpu_vnni"] = cpu_has_vnni()
    return {"version": CACHE_VERSION, "model": tensors_sha256(model.state_dict(), {"class": type(model).__name__}), "data": _digest(data), "timing": timing}


def _maps_for(run: _Run, model: nn.Module):
    """Entropy maps of ``model`` as it is when the freezing step runs (after quantization), on the
    calibration images, as ``eamvit compress`` computes them; one computation per quantization and weights."""
    cfg = step_config(model, "quant")
    key = json.dumps([cfg.to_dict() if cfg is not None else "fp32", model_spec(model).checkpoint_sha256],
                     sort_keys=True, default=str)
    if key not in run.maps:
        sp = run.splits
        run.maps[key] = compute_entropy_maps(model, sp.calib_set, indices=sp.calib_indices, bits=8,
                                             batch_size=run.config.batch_size, progress=False,
                                             options=CalibOptions(workers=run.config.workers, device=run.device))
    return run.maps[key]


def tuned_weights(run: _Run, cand: Candidate) -> Path:
    """The checkpoint of the run's model fine-tuned with ``cand``'s token reduction applied (``cand.finetune``,
    on the run's training images), made once per reduction and run."""
    key = _tuning_key(cand)
    if key not in run.tuned:
        m = copy.deepcopy(run.model)
        apply_(m, Recipe(steps=(cand.reduction,)), None, device=run.device)
        finetune(m, run.train_set, cand.finetune, device=_device_of(run.model), workers=run.config.workers,
                 progress=False)
        path = run.workdir / f"finetuned-{key[:16]}.safetensors"
        save_checkpoint(m, path, data_config(run.model), extra={"finetune": cand.finetune.to_dict(),
                                                               "reduction": cand.reduction.to_dict()})
        run.tuned[key] = path
    return run.tuned[key]


def _tuning_key(cand: Candidate) -> str:
    return _digest([cand.reduction.to_dict(), cand.finetune.to_dict()])


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def base_model(run: _Run, cand: Candidate) -> nn.Module:
    """A fresh copy of the weights ``cand``'s recipe is applied to: the run's model, or that model with the weights
    fine-tuned for its reduction loaded, named by the checkpoint's digest as ``--checkpoint`` would name them (so
    that its saved state is refused on any other weights)."""
    m = copy.deepcopy(run.model)
    if cand.finetune is not None:
        path = tuned_weights(run, cand)
        load_state_dict_strict(m, read_checkpoint(path)[0], str(path))
        state_of(m).spec = replace(model_spec(run.model), checkpoint_sha256=file_sha256(path), pretrained=False)
    return m


def build(run: _Run, cand: Candidate) -> nn.Module:
    """A copy of the run's model (or of its fine-tuned weights) compressed by ``cand``'s recipe (the one recipe
    path)."""
    m = base_model(run, cand)
    calib = run.calib if cand.recipe.step("quant") is not None else None
    apply_(m, cand.recipe, calib, maps=lambda model: _maps_for(run, model), device=run.device)
    return m.eval()


def _top1(run: _Run, model: nn.Module, device) -> dict[str, Any]:
    sp, c = run.splits, run.config  # every accuracy field of a results row
    return evaluate(model, sp.eval_set, sp.eval_indices, batch_size=c.batch_size, workers=c.workers, device=device,
                    progress=False)


def _shipped_file(run: _Run, model: nn.Module, cand: Candidate, stem: str) -> Path:
    """Write the file ``cand`` ships from ``model`` (built by its recipe) into the work folder: its export,
    or for an NNCF point that (fp32) export quantized by NNCF into an OpenVINO IR (``stem.xml`` + ``.bin``)."""
    path = run.workdir / f"{stem}.onnx"
    export_onnx(model, path, cand.export)
    if not cand.nncf:
        return path
    nncf_quantize(path, path.with_suffix(".xml"), run.nncf_images, calibration=run.nncf_calibration)
    return path.with_suffix(".xml")


def _runner(run: _Run, path: Path) -> tuple[nn.Module, Callable[[], Any]]:
    """The exported file in the run's runtime: a classifier (images → logits) and its bare call on the timed batch."""
    x = run.batch.numpy()
    if run.config.runtime == "openvino":
        ov = OpenVinoClassifier(path, run.config.threads)
        return ov, lambda: ov.request.infer({0: x})
    ort = OnnxClassifier(path, run.config.threads)
    return ort, lambda: ort.session.run([ort.output_name], {ort.input_name: x})


def measure(run: _Run, cand: Candidate) -> dict[str, Any]:
    """The point of ``cand``: label, recipe, export, top-1, speed-up and bytes, or the reason it cannot be built.
    In ONNX Runtime and OpenVINO both are measured on the file the point ships: what is evaluated is what is shipped."""
    t0 = time.perf_counter()
    point: dict[str, Any] = {"label": cand.label, **cand.identity()}
    try:
        m = build(run, cand)
        if run.config.runtime == "torch":
            s = measure_speedup(m, run.model, Timing(batch_size=len(run.batch), warmup=2, reps=run.config.reps),
                                input_size=tuple(run.batch.shape[1:]), device=run.device)
            point.update(_top1(run, m, run.device), **{k: s[k] for k in ("speedup", "speedup_p25", "speedup_p75")},
                         model_bytes=model_size(m).model_bytes)
        else:
            path = _shipped_file(run, m, cand, "candidate")
            clf, call = _runner(run, path)
            times = time_calls([run.reference_call, call], warmup=2, reps=run.config.reps)
            point.update(_top1(run, clf, "cpu"), **speedup_fields(*times), file_bytes=model_bytes(path))
    except EamError as e:  # a step this model or its export cannot take: recorded, never chosen
        point["error"] = str(e)
    point["seconds"] = round(time.perf_counter() - t0, 2)
    return point


@dataclass
class Progress:
    """How far a search got: points measured by this run, read from the cache (``reused``), and the candidates
    left (``not_run``) when the time budget ``stopped`` it."""

    measured: int = 0
    reused: int = 0
    not_run: int = 0
    stopped: bool = False


def _within(point: dict[str, Any], ref_top1: float, max_drop: float) -> bool:
    return "error" not in point and ref_top1 - point["top1"] <= max_drop + 1e-9


def _best_note(done: Sequence[tuple[Candidate, dict]], ref_top1: float, max_drop: float) -> str:
    ok = [p for c, p in done if c.techniques and _within(p, ref_top1, max_drop)]
    if not ok:
        return "best: none yet"
    b = max(ok, key=lambda p: p["speedup"])
    return f"best: {b['label']} x{b['speedup']:.2f} top-1 {b['top1']:.2f}"


def _run_candidates(run: _Run, cache: PointCache, cands: Sequence[Candidate], done: list, prog: Progress,
                    bar: tqdm, deadline: Optional[float]) -> None:
    """Measure (or read from the cache) each candidate in order, until the deadline."""
    for i, cand in enumerate(cands):
        if deadline is not None and time.monotonic() > deadline and done:
            prog.stopped, prog.not_run = True, prog.not_run + len(cands) - i
            return
        # A fine-tuned point depends on the training images too.
        train = {"train": run.train_record} if cand.finetune is not None else {}
        key = _digest({**run.key_base, **cand.identity(), **train})
        point = cache.get(key)
        if point is None:
            tuning = cand.finetune is not None and _tuning_key(cand) not in run.tuned
            bar.set_description(f"optimize: {cand.label}" + (f" (fine-tuning {cand.finetune.epochs} epochs)"
                                                             if tuning else ""))
            point = measure(run, cand)
            cache.add(key, point)
            prog.measured += 1
        else:
            prog.reused += 1
        if not done and "error" in point:
            raise EamError(f"the unmodified model cannot be measured: {point['error']}")
        if not done:  # unreadable files are skipped: what was scored may be fewer than the held-out images
            check_resolution(point["num_images"], run.config.max_drop)
        done.append((cand, point))
        bar.update(1)
        bar.set_postfix_str(_best_note(done, done[0][1]["top1"], run.config.max_drop))


def search(run: _Run, cache: PointCache, progress: bool = True) -> tuple[list[tuple[Candidate, dict]], Progress]:
    """The reference, every single technique, then the stacks of those within the budget: ``[(candidate, point)]``
    in search order, and how far it got."""
    c = run.config
    deadline = time.monotonic() + 60 * c.budget_minutes if c.budget_minutes else None
    singles = single_candidates(len(getattr(run.model, "blocks", ())) or 12, c.runtime, c.space, c.seed,
                                merges=merge_options(run.model, c.space), prunes=c.prunes)
    done: list[tuple[Candidate, dict]] = []
    prog = Progress()
    with tqdm(total=1 + len(singles), desc="optimize", unit="point", disable=not progress,
              dynamic_ncols=True) as bar:
        _run_candidates(run, cache, [reference(c.runtime), *singles], done, prog, bar, deadline)
        if prog.stopped:
            return done, prog
        ref_top1 = done[0][1]["top1"]
        if c.finetune is not None:  # only the reductions that miss the budget: the others need no training
            tuned = [finetuned(cand, c.finetune) for cand, p in done[1:] if cand.reduction is not None
                     and "error" not in p and not _within(p, ref_top1, c.max_drop)]
            bar.total += len(tuned)
            bar.refresh()
            _run_candidates(run, cache, tuned, done, prog, bar, deadline)
            if prog.stopped:
                return done, prog
        combos = combinations([(cand, _within(p, ref_top1, c.max_drop)) for cand, p in done[1:]])
        bar.total += len(combos)
        bar.refresh()
        _run_candidates(run, cache, combos, done, prog, bar, deadline)
    return done, prog


@dataclass
class OptimizeResult:
    """What :func:`optimize` found and wrote.

    Args:
        rows: one row per point (:func:`~eamvit.experiments.optimize_report.point_rows`), the reference first.
        best: the chosen row (fastest within the budget), ``None`` when no point is within it.
        files: ``{name: path}`` of what was written.
    """

    rows: list[dict[str, Any]]
    best: Optional[dict[str, Any]]
    progress: Progress
    files: dict[str, Path]


def check_resolution(num_images: int, max_drop: float) -> None:
    """Refuse a ``max_drop`` (but 0) finer than one of ``num_images`` held-out images (100/n points of top-1): the
    search would separate points by sampling noise."""
    step = 100.0 / max(num_images, 1)
    if max_drop > 0 and step > max_drop + 1e-9:
        need = math.ceil(100.0 / max_drop - 1e-9)
        raise EamError(f"{num_images} held-out image{'s' if num_images != 1 else ''} cannot resolve --max-drop "
                       f"{max_drop:g}: one image is {step:.3g} points of top-1; give at least {need} held-out images "
                       f"(more images in --data, or a larger --num-samples) or allow --max-drop "
                       f"{math.ceil(step * 100) / 100:g} or more")


def _images(dataset, indices, n: int, what: str, consequence: str) -> torch.Tensor:
    items = readable_items(dataset, indices, n)
    if not items:
        raise EamError(f"none of the {what} can be read, so {consequence}")
    return torch.stack([it[0] for it in items])


def _setup(model: nn.Module, sp: Splits, config: OptimizeConfig, device, workdir: Path) -> _Run:
    """The run's shared inputs: the timed batch (held-out images), the fp32 export for ONNX Runtime and
    OpenVINO, and NNCF's calibration images for OpenVINO."""
    batch = _images(sp.eval_set, sp.eval_indices, config.batch_size, "held-out images", "nothing can be timed or "
                    "scored; check the files of --data (or drop --num-samples)")
    run = _Run(model.eval(), sp, config, device, workdir, batch, _key_base(model, sp, config))
    if config.runtime != "torch":
        export_onnx(model, workdir / "reference.onnx")
        run.reference_call = _runner(run, workdir / "reference.onnx")[1]
    if config.runtime == "openvino":  # NNCF's images: the first readable ones of the calibration split
        run.nncf_images = _images(sp.calib_set, sp.calib_indices, NNCF_CALIB_SIZE, "calibration images",
                                  "NNCF cannot calibrate; check --calib-data (or --data)")
        run.nncf_calibration = [calibration_record(sp.calib_set, sp.calib_indices)]
    return run


BEST_FILES = ("best.onnx", "best.xml", "best.bin", "best_weights.safetensors")  # besides best.safetensors


def _write_best(run: _Run, cand: Candidate, point: dict[str, Any], out: Path) -> dict[str, Any]:
    """``best.safetensors`` and the shipped file, each rebuilt from the file before it and checked against the
    point the search measured before it is moved into ``out`` (``docs/architecture-experiments.md``, "optimize").

    Returns:
        ``{"files": {...}, "top1_torch": ..., "file_bytes": ...}``: the PyTorch top-1 of the saved file
        (``eval --state``'s) and the bytes of the shipped file (``None`` for PyTorch).
    """
    tmp = run.workdir
    save_compressed(build(run, cand), tmp / "best.safetensors", cand.recipe)
    names = ["best.safetensors"]
    if cand.finetune is not None:  # the weights its state was made on: the state names their digest
        shutil.copyfile(tuned_weights(run, cand), tmp / "best_weights.safetensors")
        names.append("best_weights.safetensors")
    fresh = base_model(run, cand)
    restore_(fresh, tmp / "best.safetensors")
    top1_torch = _top1(run, fresh.eval(), run.device)["top1"]
    shipped, size = top1_torch, None
    if run.config.runtime != "torch":
        path = _shipped_file(run, fresh, cand, "best")
        size = model_bytes(path)
        shipped = _top1(run, _runner(run, path)[0], "cpu")["top1"]
        names += ["best.xml", "best.bin"] if cand.nncf else ["best.onnx"]
    if shipped != point["top1"]:
        raise EamError(f"the rebuilt best point ({cand.label}) scores {shipped} but the search measured "
                       f"{point['top1']}; delete {out / CACHE} and run again")
    files = {}
    for name in names:
        with atomic_path(out / name) as dst:
            shutil.copyfile(tmp / name, dst)
        files[name] = out / name
    for name in BEST_FILES:
        if name not in names:
            (out / name).unlink(missing_ok=True)  # another point's file: it would pass for this one
    return {"files": files, "top1_torch": top1_torch, "file_bytes": size}


def optimize(model: nn.Module, splits: Splits, out: str | Path, config: OptimizeConfig = OptimizeConfig(),
             commands: Optional[CommandLines] = None, device=None, progress: bool = True,
             train_set: Optional[Dataset] = None) -> OptimizeResult:
    """Search, write ``pareto.csv/json/md``, ``best.safetensors`` (+ ``best.onnx``, or ``best.xml``/``.bin`` for
    an NNCF point) and ``report.md`` in ``out``; the figure (``pareto.png``) is the caller's.

    Args:
        model: the unmodified, instrumented model (not changed).
        out: output folder (its ``points.jsonl`` is read first: a rerun resumes).
        commands: the model and data options that rebuild the chosen point (for the report).
        device: where PyTorch runs (ONNX Runtime and OpenVINO run on CPU).
        train_set: the training images of ``config.finetune`` (augmented as training wants them; never the
            held-out images).
    """
    if config.finetune is not None and train_set is None:
        raise EamError("fine-tuning in optimize needs training images: pass train_set (the CLI: --calib-data, or "
                       "the digits' training split)")
    if config.runtime == "openvino":
        require_openvino("eamvit optimize --runtime openvino", nncf=True)
    check_resolution(len(splits.eval_indices if splits.eval_indices is not None else splits.eval_set),
                     config.max_drop)
    cache = PointCache(Path(out) / CACHE)  # refused before anything is measured or written
    out = ensure_writable_dir(out)
    commands = commands or CommandLines()
    with tempfile.TemporaryDirectory(prefix="eamvit-optimize-") as tmp:
        run = _setup(model, splits, config, device, Path(tmp))
        if train_set is not None:
            run.train_set, run.train_record = train_set, calibration_record(train_set)
        done, prog = search(run, cache, progress)
        rows = point_rows(done, config, model, splits.data_config)
        best = next((r for r in rows if r["chosen"]), None)
        cand, files = None, {}
        if best is not None:
            cand, point = done[rows.index(best)]  # rows are in search order
            extra = _write_best(run, cand, point, out)
            best["top1_torch"] = extra["top1_torch"]  # what `eval --state` of best.safetensors gives
            if extra["file_bytes"] is not None:
                best["file_bytes"] = extra["file_bytes"]
            files.update(extra["files"])
        files.update(write_pareto(out, rows, config.runtime))
        files["report"] = out / "report.md"
        write_text(files["report"], report_text(rows, best, cand, prog, config, commands, out, model))
    return OptimizeResult(rows, best, prog, files)
