"""FP vs RepQ-ViT vs ADFQ-ViT vs PMQ on one model and data: top-1, model size, calibration time, optionally with
EAM freezing on top. Design: ``docs/architecture-experiments.md``, "compare".
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.experiments.results import Column, ResultRow, markdown
from eamvit.experiments.runner import Applied, EvalData, Point, run_sweep
from eamvit.experiments.size import model_size
from eamvit.methods import adfq, pmq, repq
from eamvit.methods.calibrate import compute_entropy_maps
from eamvit.methods.freeze import FreezeConfig
from eamvit.methods.quantize import quantize_
from eamvit.methods.recipe import Recipe, apply_
from eamvit.choices import COMPARE_METHODS as METHODS, CompareMethod  # defined torch-free for the CLI


@dataclass(frozen=True)
class CompareConfig(Config):
    """What :func:`compare` runs.

    Args:
        methods: subset of ``fp``, ``repq``, ``adfq``, ``pmq``.
        settings: ``(w_bits, a_bits)`` pairs (the seeds' W4/A4 and W6/A6).
        pmq_budgets: extra PMQ rows as ``"W/A/P(MP)"`` strings (budget = all weights at W bits).
        repq, adfq, pmq: each method's settings, bits overridden per setting (PMQ's P = A).
        freeze_sparsity: τ of EAM freezing on top of every quantized model (None: no freezing).
        entropy_bits: histogram bits of the entropy maps for freezing.
    """

    methods: tuple[CompareMethod, ...] = METHODS
    settings: tuple[tuple[int, int], ...] = ((4, 4), (6, 6))
    pmq_budgets: tuple[str, ...] = ()
    repq: repq.RepQConfig = field(default_factory=repq.RepQConfig)
    adfq: adfq.ADFQConfig = field(default_factory=adfq.ADFQConfig)
    pmq: pmq.PMQConfig = field(default_factory=pmq.PMQConfig)
    freeze_sparsity: Optional[float] = None
    entropy_bits: int = 8
    batch_size: int = 64
    progress: bool = False

    KIND = "compare"
    VERSION = 1

    def _check(self) -> None:
        if not self.methods:
            raise EamError(f"methods must be a non-empty subset of {', '.join(METHODS)}")
        for w, a in self.settings:
            replace(self.repq, w_bits=w, a_bits=a)
        for text in self.pmq_budgets:
            pmq.parse_bits_config(text)
        if self.freeze_sparsity is not None and not 0 <= self.freeze_sparsity <= 1:
            raise EamError(f"freeze_sparsity={self.freeze_sparsity} must be a fraction in [0, 1]")


# The demo's fast settings: few ADFQ-ViT iterations (the paper's 3000 are far too slow for a demo), 64 images.
DEMO_CONFIG = CompareConfig(adfq=adfq.ADFQConfig(calib_size=64, iterations=20), pmq_budgets=("8/8/4(MP)",))


def _runs(config: CompareConfig) -> list[tuple[str, str, Any]]:
    """``(method, label, config)`` in table order."""
    runs: list[tuple[str, str, Any]] = []
    if "fp" in config.methods:
        runs.append(("fp", "32/32", None))
    for w, a in config.settings:
        runs += [(m, f"{w}/{a}", replace(getattr(config, m), w_bits=w, a_bits=a)) for m in ("repq", "adfq")
                 if m in config.methods]
        if "pmq" in config.methods:
            cfg = replace(config.pmq, w_bits=w, a_bits=a, p_bits=a)
            runs.append(("pmq", f"{w}/{a}/{a}" + ("(MP)" if cfg.mixed or cfg.aas else ""), cfg))
    for text in config.pmq_budgets:
        runs.append(("pmq", text, replace(config.pmq, **pmq.parse_bits_config(text))))
    return runs


NAMES = {"fp": "Full precision", "repq": "RepQ-ViT", "adfq": "ADFQ-ViT", "pmq": "PMQ"}


def _method_point(method: str, label: str, cfg: Any, calib: Dataset | torch.Tensor, config: CompareConfig) -> Point:
    """A point that quantizes a copy of the model with ``method`` (timed) and freezes it if asked."""
    @contextmanager
    def quantized(model: nn.Module, seed: int) -> Iterator[Applied]:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        if method != "fp":
            quantize_(m, cfg, calib, progress=config.progress)
        seconds = time.perf_counter() - t0
        fields: dict[str, Any] = {"model_bytes": model_size(m).model_bytes,
                                  "calib_seconds": round(seconds, 3) if method != "fp" else 0.0}
        if config.freeze_sparsity is not None:  # EAM on the quantized model, with maps of that model itself
            maps = lambda q: compute_entropy_maps(q, calib, bits=config.entropy_bits, batch_size=config.batch_size,
                                                  progress=config.progress)
            report = apply_(m, Recipe(steps=(FreezeConfig(tau=config.freeze_sparsity),)), calib, maps=maps)["freeze"]
            fields.update(tau=config.freeze_sparsity, frozen_fraction=report.frozen_fraction)
        yield Applied(fields, model=m)

    return Point({"quant": method, "bits": label}, quantized)


def compare(model_factory: Callable[[], nn.Module], calib: Dataset | torch.Tensor, test: Dataset,
            config: Optional[CompareConfig] = None, device: torch.device | str | None = None,
            test_indices: Optional[Sequence[int]] = None, data_config: Optional[dict] = None) -> list[ResultRow]:
    """One row per method and setting, each quantized from a copy of one full-precision model, with ``bits``
    (W/A or W/A/P), ``model_bytes``, ``calib_seconds`` and ``top1_delta`` (against the full-precision row).

    Args:
        model_factory: returns the full-precision, instrumented model (called once).
        calib: calibration images: a dataset of ``(image, target)`` (PMQ then uses the labels) or a tensor.
        test_indices: evaluate on these items only.
        data_config: the timm data config of ``test`` (recorded in the rows).
    """
    config = config or CompareConfig()
    if config.freeze_sparsity is not None and not isinstance(calib, Dataset):
        raise EamError("freezing needs the calibration set as a dataset (the entropy maps are computed on it)")
    model = model_factory()
    if device is not None:
        model.to(device)
    model.eval()
    points = [_method_point(method, label, cfg, calib, config) for method, label, cfg in _runs(config)]
    data = EvalData(test, test_indices, batch_size=config.batch_size, device=device, data_config=data_config)
    rows = run_sweep(model, data, points, progress=config.progress, desc="compare")
    fp = next((r["top1"] for r in rows if r["quant"] == "fp"), None)
    for r in rows:
        r.fields["top1_delta"] = round(r["top1"] - fp, 3) if fp is not None and r["quant"] != "fp" else None
    return rows


def markdown_table(rows: Sequence[ResultRow | dict]) -> str:
    """The seeds' table (PMQ Table III): Method | W/A(/P) | Size (MB) | Top-1 | Δ top-1 | Calib. (s)."""
    cols = [Column("quant", "Method", NAMES.get), Column("bits", "W/A(/P)")]
    if any("tau" in r for r in rows):
        cols.append(Column("tau", "EAM τ"))
    return markdown(rows, cols + [Column("model_bytes", "Size (MB)", lambda b: f"{b / 1e6:.3f}"),
                                  Column("top1", "Acc (Top-1)", ".2f"), Column("top1_delta", "Δ top-1", "+.2f"),
                                  Column("calib_seconds", "Calib. (s)", ".1f")])
