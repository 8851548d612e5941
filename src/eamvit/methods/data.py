"""Datasets, calibration subsets and loaders: the one rule for evaluation and calibration images (the
datasets themselves are :mod:`eamvit.methods.datasets`, re-exported here), and calibration data given as a
``forward_loop(model)`` callable that runs the model over it (as NVIDIA Model Optimizer's ``quantize``): it
must feed the same data, in the same order, at every call."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from eamvit.methods.models import PREPROCESSING_KEYS, data_config, file_sha256
from eamvit.methods.state import state_of
from eamvit.errors import EamError
# The datasets are defined there and named here too: eamvit.methods.data is where callers get data.
from eamvit.methods.datasets import DIGITS_MEAN, DIGITS_STD, DigitsDataset, ImageFolderDataset

ForwardLoop = Callable[[nn.Module], Any]


def class_mismatch(dataset: Dataset, num_classes: int, name: str) -> Optional[str]:
    """Why an ImageFolder's labels cannot be a ``num_classes``-way model's (``name``: the folder), or None.

    ImageFolder numbers its class folders 0, 1, ... in sorted order, whatever their names: a folder
    of other classes (or fewer) is scored against the wrong outputs.
    """
    if not isinstance(dataset, ImageFolderDataset) or not num_classes:
        return None
    classes = list(dataset.classes)
    if len(classes) != num_classes:
        what = f"{len(classes)} class folder{'s' if len(classes) != 1 else ''} for a {num_classes}-class model"
    elif all(c.isdigit() for c in classes) and classes != [str(i) for i in range(num_classes)]:
        what = f"numbered class folders that are not 0..{num_classes - 1}"
    else:
        return None
    # The first folder whose name is a number other than its index, e.g. `7/` scored as class 0.
    moved = next((f"folder {c} is scored as class {i}" for i, c in enumerate(classes) if c.isdigit() and int(c) != i),
                 f"folder {classes[0]} is scored as class 0")
    return (f"{name} has {what}; ImageFolder numbers the folders 0, 1, ... in sorted order ({moved}), so its "
            "top-1 is not the model's accuracy on them: give one sub-folder per model class")


def random_subset(dataset: Dataset, size: Optional[int], seed: int = 0, exclude: Sequence[int] = ()) -> list[int]:
    """Indices of a seeded random subset of ``size`` images (all, in order, when ``size`` is None)."""
    skip = set(exclude)
    pool = [i for i in range(len(dataset)) if i not in skip]
    if size is None:
        return pool
    if size < 1:
        raise EamError(f"subset size must be at least 1, got {size}")
    if size > len(pool):
        raise EamError(f"asked for {size} images but only {len(pool)} are available; lower --calib-size/--num-samples")
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in perm[:size]]


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Every ``world``-th index from ``rank``: disjoint shards with no padding, so counts stay exact."""
    return list(indices[rank::world])


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor
    skipped: int


def _collate(items: list) -> Batch:
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), skipped)


def make_loader(dataset: Dataset, indices: Optional[Sequence[int]] = None, batch_size: int = 64,
                workers: int = 0, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A loader of :class:`Batch` over ``indices`` of ``dataset`` (in the given order unless shuffled)."""
    ds = Subset(dataset, list(indices)) if indices is not None else dataset
    g = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=_collate,
                      generator=g, persistent_workers=False)


def readable_items(dataset: Dataset, indices: Optional[Sequence[int]], n: int) -> list[tuple[torch.Tensor, int]]:
    """The first ``n`` readable items of ``dataset`` among ``indices`` (all by default), in order;
    unreadable files are passed over as a loader skips them. May be fewer than ``n``, or none."""
    items = map(dataset.__getitem__, range(len(dataset)) if indices is None else indices)
    return list(itertools.islice((item for item in items if item is not None), n))


def _digits_config(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """What ``--data digits`` really does: resize 8x8 to the model's side, no crop, mean/std 0.5 unless overridden."""
    if overrides.get("crop_pct") not in (None, 1.0) or overrides.get("crop_mode") not in (None, "center"):
        raise EamError("--data digits is never cropped; drop --crop-pct/--crop-mode (or use an ImageFolder of digits)")
    if int(cfg["input_size"][0]) != 1:
        raise EamError(f"--data digits has one channel but the model reads {cfg['input_size'][0]}; "
                       "create it with --model-kwargs in_chans=1")
    mean, std = overrides.get("mean") or [DIGITS_MEAN], overrides.get("std") or [DIGITS_STD]
    changed = any(overrides.get(k) is not None for k in ("mean", "std", "interpolation", "img_size"))
    # Rows must not name an interpolation where nothing is resized (8x8 digits at side 8).
    resize = int(cfg["input_size"][-1]) != 8
    return {"input_size": tuple(cfg["input_size"]),
            "interpolation": (overrides.get("interpolation") or "bilinear") if resize else None,
            "crop_pct": 1.0, "crop_mode": "center", "mean": (float(mean[0]),), "std": (float(std[0]),),
            "source": "overrides" if changed else "digits"}


def digits_data_config(img_size: int = 16) -> dict[str, Any]:
    """The preprocessing of :class:`DigitsDataset` at side ``img_size`` (what a model trained on it must carry)."""
    return {k: v for k, v in _digits_config({"input_size": (1, img_size, img_size)}, {}).items() if k != "source"}


def eval_transform(cfg: dict[str, Any]) -> Callable:
    """timm's evaluation transform of data config ``cfg`` (resize, crop, normalize) for image files."""
    return create_transform(**{k: v for k, v in cfg.items() if k in PREPROCESSING_KEYS}, is_training=False)


def build_dataset(spec: str, model_cfg: Optional[dict[str, Any]] = None, split: str = "test",
                  strict_images: bool = False, img_size: int = 16, transform: Optional[Callable] = None,
                  augment: bool = False) -> Dataset:
    """``"digits"`` (with ``split``) or a path to an ImageFolder tree, preprocessed by ``model_cfg`` (digits:
    its side, mean, std and interpolation; ``img_size`` without one).

    Args:
        transform: an ImageFolder's transform instead of ``model_cfg``'s evaluation one (training
            augmentation); ``model_cfg`` still says whether images are read as grayscale.
        augment: digits only: random ±1-pixel shifts (training).
    """
    if spec == "digits":
        if model_cfg is None:
            return DigitsDataset(split, img_size=img_size, augment=augment)
        c = model_cfg
        return DigitsDataset(split, img_size=int(c["input_size"][-1]), augment=augment, mean=float(c["mean"][0]),
                             std=float(c["std"][0]), interpolation=c.get("interpolation") or "bilinear")
    cfg = dict(model_cfg or {})
    ds = ImageFolderDataset(spec, transform if transform is not None else eval_transform(cfg),
                            grayscale=cfg.get("input_size", (3,))[0] == 1, strict=strict_images)
    if len(ds) == 0:
        raise EamError(f"image folder {spec} contains no images")
    ds.require_readable()
    return ds


def _unwrap(dataset: Any, indices: Optional[Sequence[int]]) -> tuple[Any, list[int]]:
    """The dataset under any ``Subset`` wrappers and the indices into it that ``indices`` select."""
    idx = list(range(len(dataset))) if indices is None else list(indices)
    while isinstance(dataset, Subset):
        idx = [int(dataset.indices[i]) for i in idx]
        dataset = dataset.dataset
    return dataset, idx


def _relative_paths(ds: ImageFolderDataset) -> list[str]:
    root = ds.folder.root
    return [Path(os.path.relpath(p, root)).as_posix() for p, _ in ds.folder.samples]


def _file_digest(path: str) -> str:
    """First 16 hex digits of the file's SHA-256 ("" when it cannot be read: it calibrated nothing)."""
    try:
        return file_sha256(path)[:16]
    except OSError:
        return ""


def calibration_record(dataset: Any, indices: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """What an artifact records about the images (``indices`` of ``dataset``, possibly a ``Subset``) that
    calibrated it, so that evaluation can skip them: an ImageFolder's relative paths with a digest of each
    file's bytes, the digits' split and indices, ``data: None`` for anything else."""
    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):  # tensors, loaders, streams
        return {"data": None}
    base, idx = _unwrap(dataset, indices)
    if isinstance(base, ImageFolderDataset):
        rel = _relative_paths(base)
        files = {rel[i]: _file_digest(base.folder.samples[i][0]) for i in sorted(idx, key=lambda i: rel[i])}
        return {"data": str(base.root), "num_images": len(idx), "files": files}
    if isinstance(base, DigitsDataset):
        return {"data": "digits", "split": base.split, "num_images": len(idx), "indices": sorted(idx)}
    return {"data": None, "num_images": len(idx)}


def _record_ok(record: Any) -> bool:
    """Whether one record read from a file is what :func:`calibration_record` writes."""
    files, indices = (record.get("files", {}), record.get("indices", [])) if isinstance(record, dict) else (0, 0)
    return (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
            and isinstance(indices, list) and all(isinstance(i, int) for i in indices))


def check_records(records: Any, name: str = "a file eamvit read") -> list[dict]:
    """``records`` (file ``name``'s ``calibration`` metadata), refused unless a list of calibration records."""
    if not isinstance(records, list) or not all(map(_record_ok, records)):
        raise EamError(f"{name} has a malformed record of its calibration images; create it again")
    return records


def recorded_indices(dataset: Dataset, record: dict) -> list[int]:
    """Indices of the items of ``dataset`` that a (checked) :func:`calibration_record` names."""
    files = record.get("files", {})
    if isinstance(dataset, DigitsDataset):
        if record.get("data") != "digits" or record.get("split") != dataset.split:
            return []
        return sorted(set(record.get("indices", [])) & set(range(len(dataset))))
    if isinstance(dataset, ImageFolderDataset) and files:
        rel = _relative_paths(dataset)
        # Names first (cheap), then bytes: only the few files that share a recorded name are read.
        return [i for i, r in enumerate(rel) if files.get(r) and files[r] == _file_digest(dataset.folder.samples[i][0])]
    return []


def _describe(record: dict) -> str:
    if record.get("data") == "digits":
        return f"the digits {record.get('split')} split"
    return str(record["data"]) if record.get("data") else "images eamvit cannot name (tensors)"


def calibrated_skips(dataset: Dataset, data: str, artifacts: Sequence[tuple[str, Optional[list]]]
                     ) -> tuple[set[int], list[str], list[str]]:
    """``(indices to skip, one line per artifact that records images, names of artifacts that record none)``:
    the items of ``dataset`` (named ``data``) that calibrated the artifacts a command evaluates.

    Args:
        artifacts: ``(name, records)`` per artifact; records ``None``: the artifact records none
            (written before eamvit recorded them).
    """
    skip: set[int] = set()
    lines, unrecorded = [], []
    data = "the digits test split" if data == "digits" else data  # what `--data digits` evaluates
    for name, records in artifacts:
        if records is None:
            unrecorded.append(name)
            continue
        hits = set().union(*(recorded_indices(dataset, r) for r in check_records(records, name)))
        skip |= hits
        if hits:
            lines.append(f"scoring skips the {len(hits)} images of {data} that calibrated {name}")
        elif records:
            where = ", ".join(dict.fromkeys(_describe(r) for r in records))
            lines.append(f"{name} was calibrated on {where}, none of them in {data}: scoring skips nothing")
    return skip, lines, unrecorded


@dataclass
class Splits:
    """Evaluation and calibration sets of one command (see :func:`build_splits`); indices of ``None`` mean every
    item, ``calib_excluded`` counts the images left out because they calibrated what is evaluated."""

    eval_set: Optional[Dataset]
    eval_indices: Optional[list[int]]
    calib_set: Optional[Dataset]
    calib_indices: Optional[list[int]]
    data_config: dict[str, Any]
    calib_note: str = ""
    calib_excluded: int = 0
    skip_notes: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)


def build_splits(data: str, cfg: dict[str, Any], *, overrides: Optional[dict[str, Any]] = None,
                 calib_data: Optional[str] = None, num_samples: Optional[int] = None,
                 calib_size: Optional[int] = None, seed: int = 0, evaluate: bool = True, calibrate: bool = True,
                 strict_images: bool = False, calib_all: bool = False, calib_need: int = 0,
                 calibrated_on: Sequence[tuple[str, Optional[list]]] = ()) -> Splits:
    """The one rule every command uses for its evaluation and calibration images.

    Calibration images: ``calib_data`` if given, else the digits training split, else a seeded held-out
    part of ``data`` (at most half of it); ``calib_size`` of them, default min(512, available)
    (``calib_all``: all). Evaluation never scores an image that calibrated what it evaluates.

    Args:
        data: ``"digits"`` (evaluated: its test split) or an ImageFolder root, preprocessed by ``cfg``.
        overrides: the preprocessing overrides the user gave (digits apply mean/std/interpolation only).
        num_samples: evaluate a seeded random subset of this size.
        evaluate: the command evaluates on ``data`` (else ``data`` is calibration only).
        calib_all: calibrate on every available image by default (``calibrate``: the user chose them).
        calib_need: images the calibration method reads (ADFQ-ViT: 1024); the default number is then
            min(max(512, calib_need), available).
        calibrated_on: ``(name, records)`` of the artifacts evaluated: the images they record are never scored.
    """
    ov = overrides or {}
    if calib_data == "digits" and data != "digits":
        raise EamError("--calib-data digits needs --data digits: both must share one preprocessing")
    eff = _digits_config(cfg, ov) if data == "digits" else dict(cfg)
    build = lambda spec, split: build_dataset(spec, eff, split=split, strict_images=strict_images)
    ev = build(data, "test") if evaluate else None
    cal, cal_idx, note, hold = None, None, "", False
    if calibrate:
        cal, cal_idx, note, hold = _calibration(build, ev, data, calib_data, calib_size, seed, calib_all, calib_need)
    sp = Splits(ev, None, cal, cal_idx, eff, note)
    if ev is not None:
        _eval_indices(sp, data, num_samples, seed, hold, calibrated_on)
    return sp


def _calibration(build: Callable, ev: Optional[Dataset], data: str, calib_data: Optional[str],
                 calib_size: Optional[int], seed: int, calib_all: bool,
                 calib_need: int = 0) -> tuple[Dataset, list[int], str, bool]:
    """``(calibration set, its indices, the note saying so, whether they are held out of ev)``."""
    if calib_data or ev is None or data == "digits":
        src = calib_data or data
        cal, hold = build(src, "train"), False
        where = "the digits training split" if src == "digits" else src
    else:
        cal, where, hold = ev, f"{data} (held out: evaluation skips them)", True
    avail = len(cal) // 2 if hold else len(cal)
    if calib_size is None and calib_all and not hold:
        return cal, list(range(len(cal))), f"calibration: {avail} images from {where} (default: all of them)", hold
    default = max(512, calib_need)  # the calibration images every command takes by default
    n = calib_size if calib_size is not None else min(default, avail)
    if hold and n >= len(cal):
        raise EamError(f"--calib-size {n} leaves no images of {data} to evaluate; lower it or pass --calib-data")
    if n == 0:  # held out: half of a 1-image folder is no image
        raise EamError(f"{data} has {len(cal)} image{'s' if len(cal) != 1 else ''}: too few to hold out calibration "
                       "images and still evaluate; pass --calib-data")
    note = (f"calibration: {n} images from {where} "
            f"({'--calib-size' if calib_size is not None else f'default min({default}, {avail} available)'})")
    return cal, random_subset(cal, n, seed), note, hold


def _eval_indices(sp: Splits, data: str, num_samples: Optional[int], seed: int, hold: bool,
                  calibrated_on: Sequence[tuple[str, Optional[list]]]) -> None:
    """Fill ``sp``'s evaluation indices: never an image that calibrated what is evaluated."""
    ev = sp.eval_set
    skip, sp.skip_notes, sp.unrecorded = calibrated_skips(ev, data, calibrated_on)
    if hold:
        skip.update(sp.calib_indices)
    elif sp.calib_set is not None:  # --calib-data naming images of --data: those are skipped too
        mine = recorded_indices(ev, calibration_record(sp.calib_set, sp.calib_indices))
        if mine:
            sp.calib_note += f"; {len(mine)} of them are in {data}: evaluation skips them"
        skip.update(mine)
    sp.calib_excluded = len(skip)
    if num_samples or skip:
        sp.eval_indices = random_subset(ev, num_samples, seed + 1 if hold else seed, exclude=sorted(skip))
        if not sp.eval_indices:
            raise EamError(f"all {len(skip)} images of {data} calibrated what is evaluated, and no image is scored "
                           "with what it calibrated; evaluate on another folder, or calibrate on part of it "
                           "(--calib-size)")


def add_calibration(model: Any, records: Sequence[dict], name: str = "a file eamvit read") -> None:
    """Add ``records`` (:func:`calibration_record`, checked: read from file ``name``) to the model's state, once
    each: what is saved or exported from a model names every image that calibrated it (quantization, the maps
    it was frozen with)."""
    have = list(state_of(model).calibration or [])
    for r in check_records(list(records) if isinstance(records, tuple) else records, name):
        if r not in have:
            have.append(r)
    state_of(model).calibration = have


def choose_data_config(model: Any, data: str, overrides: dict[str, Any],
                       saved: Optional[tuple[str, str, Any]] = None) -> dict[str, Any]:
    """The preprocessing a command uses: the ``overrides`` given, else the data config ``saved`` with an
    artifact it reads (``(kind, origin, config)``: ``kind`` becomes ``cfg["source"]``, ``origin`` names the
    file in messages), else the model's own (its checkpoint's, else timm's); ``data == "digits"`` has fixed
    preprocessing, never a saved one."""
    cfg = data_config(model, overrides)
    kind, origin, stored = saved or (None, None, None)
    if stored is not None and not isinstance(stored, dict):
        raise EamError(f"{origin} has a malformed data config (not a mapping); create it again")
    if not stored or cfg["source"] == "overrides" or data == "digits":
        return cfg
    return {**data_config(model, {k: stored[k] for k in PREPROCESSING_KEYS if k in stored}, origin), "source": kind}


def exported_preprocessing(stored: dict[str, Any], overrides: dict[str, Any], data: str, path: str) -> dict[str, Any]:
    """The preprocessing overrides that evaluate the exported model ``path`` on ``data``: the ``overrides``
    given, else what its export recorded (``stored``); the digits (one channel, never cropped) take only
    its mean, std and interpolation."""
    chans, size = stored.get("input_size", [1])[0], stored.get("input_size", [None])[-1]
    if data == "digits" and chans != 1:
        raise EamError(f"--data digits has one channel but {path} was exported for {chans}-channel images; "
                       "evaluate it on an ImageFolder (--data DIR)")
    if overrides.get("img_size") is not None and size is not None and overrides["img_size"] != size:
        raise EamError(f"--img-size {overrides['img_size']} does not fit {path}, exported for {size} px images")
    keys = ["mean", "std", "interpolation"] + (["crop_pct", "crop_mode"] if data != "digits" else [])
    return {**overrides, **{k: stored[k] for k in keys if overrides.get(k) is None and stored.get(k) is not None}}


class _FirstForwardDone(Exception):
    """Raised from the model's forward hook to stop a forward loop after its first forward."""


def check_forward_loop(data: Any, forward_loop: Optional[ForwardLoop], data_name: str) -> None:
    """Refuse no calibration data, both kinds (``data`` is named ``data_name``), or a forward loop not callable."""
    if forward_loop is None and data is None:
        raise EamError(f"calibration needs data: give {data_name} or forward_loop=f, where f(model) runs the model "
                       "over the calibration data")
    if forward_loop is not None and data is not None:
        raise EamError(f"give either {data_name} or forward_loop, not both")
    if forward_loop is not None and not callable(forward_loop):
        raise EamError(f"forward_loop must be a callable f(model) that runs the model over the calibration data, "
                       f"not {type(forward_loop).__name__}")


def _ran(seen: list[int]) -> list[int]:
    """``seen`` (one entry per forward), refused when the loop never ran the model."""
    if not seen:
        raise EamError("forward_loop(model) never called the model it was given; it must run that model "
                       "over the calibration data")
    return seen


def run_forward_loop(model: nn.Module, forward_loop: ForwardLoop) -> int:
    """``forward_loop(model)``; returns how many forwards of ``model`` it ran (refuses none)."""
    seen: list[int] = []
    handle = model.register_forward_hook(lambda module, args, output: seen.append(1))
    try:
        forward_loop(model)
    finally:
        handle.remove()
    return len(_ran(seen))


def run_first_forward(model: nn.Module, forward_loop: ForwardLoop, *, before: bool = False) -> int:
    """Run ``forward_loop(model)`` until the first forward of ``model`` has completed (``before``: has started,
    without running it), then stop it; returns that forward's batch size when its first input is a tensor, else 0."""
    seen: list[int] = []

    def hook(module: nn.Module, args: Any, output: Any = None) -> None:
        first = args[0] if args else None
        seen.append(int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 0)
        raise _FirstForwardDone

    handle = model.register_forward_pre_hook(hook) if before else model.register_forward_hook(hook)
    try:
        forward_loop(model)
    except _FirstForwardDone:
        pass
    finally:
        handle.remove()
    return _ran(seen)[0]
