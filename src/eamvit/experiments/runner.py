"""The one sweep runner (:func:`run_sweep`), and throughput and speed-ups of models timed by
:mod:`eamvit.experiments.timer`. Design: ``docs/architecture-experiments.md``, "runner".
"""
from __future__ import annotations

import statistics
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from eamvit.config import Config
from eamvit.errors import EamError
from eamvit.experiments.results import ResultRow
from eamvit.experiments.timer import Stats, ratio_stats, time_calls
from eamvit.methods.calibrate import dist_info
from eamvit.methods.evaluate import result_row as head_row
from eamvit.methods.models import data_config as model_data_config


@dataclass
class Applied:
    """What a point's state yields.

    Args:
        fields: measured fields added to the row; the last seed's are kept.
        model: evaluate this model instead of the runner's (e.g. a quantized copy); ``None``: the
            runner's model, changed in place.
    """

    fields: dict[str, Any] = field(default_factory=dict)
    model: Optional[nn.Module] = None


State = Callable[[nn.Module, int], AbstractContextManager]


@dataclass
class Point:
    """One configuration of a sweep.

    Args:
        fields: the label of the row (names of :data:`eamvit.columns.COLUMNS`), placed first.
        state: ``state(model, seed)``: a context manager that configures ``model`` for ``seed``,
            yields an :class:`Applied` (or ``None``) and restores ``model`` on exit.
    """

    fields: dict[str, Any]
    state: State
    seeds: Sequence[int] = (0,)


@dataclass
class EvalData:
    """Evaluation data and settings of a sweep.

    Args:
        dataset: items ``(image, target)``.
        indices: which items (all by default).
        device: where to run (the model's device by default).
        data_config: timm data config used to build ``dataset`` (recorded in the rows).
    """

    dataset: Dataset
    indices: Optional[Sequence[int]] = None
    batch_size: int = 64
    workers: int = 0
    device: torch.device | str | None = None
    data_config: Optional[dict] = None

    def evaluate(self, model: nn.Module, evaluate_fn: Optional[Callable[..., dict]] = None) -> dict:
        """Top-1/top-5 of ``model`` on these items (``evaluate_fn``: see :func:`run_sweep`)."""
        if evaluate_fn is None:
            from eamvit.methods.evaluate import evaluate as evaluate_fn
        return evaluate_fn(model, self.dataset, self.indices, batch_size=self.batch_size, workers=self.workers,
                           device=self.device, progress=False)


@dataclass(frozen=True)
class Timing(Config):
    """How :func:`measure_throughput` times a model.

    Args:
        batch_size: images per timed forward (random inputs at the model's input size).
        warmup: untimed forwards first.
    """

    batch_size: int = 32
    warmup: int = 2
    reps: int = 10

    KIND = "timing"
    VERSION = 1

    def _check(self) -> None:
        if self.batch_size < 1 or self.warmup < 0 or self.reps < 3:
            raise EamError(f"timing needs batch_size ≥ 1, warmup ≥ 0 and reps ≥ 3 (for a spread), got {self}")


@dataclass(frozen=True)
class Throughput:
    """Images per second over repetitions: median and interquartile range (25th, 75th percentile)."""

    median: float
    p25: float
    p75: float
    reps: int

    @classmethod
    def of(cls, batch_size: int, times: Sequence[float]) -> "Throughput":
        """The rates of ``batch_size`` images in each of ``times`` seconds."""
        rate = Stats.of([batch_size / s for s in times])
        return cls(median=rate.median, p25=rate.p25, p75=rate.p75, reps=len(times))

    def fields(self) -> dict[str, float]:
        return {"images_per_s": round(self.median, 2), "images_per_s_p25": round(self.p25, 2),
                "images_per_s_p75": round(self.p75, 2)}


def _timing_setup(model: nn.Module, timing: Timing, input_size: Optional[Sequence[int]],
                  device: torch.device | str | None) -> tuple[torch.Tensor, Callable[[], None]]:
    """The fixed random batch on ``device`` and the synchronisation a timed call ends with."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    input_size = input_size or tuple(int(v) for v in model_data_config(model)["input_size"])
    x = torch.randn(timing.batch_size, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    return x, (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@torch.inference_mode()
def measure_throughput(model: nn.Module, timing: Timing = Timing(), input_size: Optional[Sequence[int]] = None,
                       device: torch.device | str | None = None) -> Throughput:
    """Images per second of ``model`` in eval mode on a fixed random batch: median and quartiles over
    ``timing.reps`` forwards (a single pass is noise on a shared machine).

    Args:
        input_size: ``(C, H, W)``; the model's own by default.
        device: where to run (the model's device by default).
    """
    x, sync = _timing_setup(model, timing, input_size, device)
    with _eval_mode(model):
        return Throughput.of(timing.batch_size, time_calls([lambda: model(x)], timing.warmup, timing.reps, sync)[0])


@torch.inference_mode()
def measure_speedup(model: nn.Module, reference: nn.Module, timing: Timing = Timing(),
                    input_size: Optional[Sequence[int]] = None,
                    device: torch.device | str | None = None) -> dict[str, float]:
    """Speed of ``model`` relative to ``reference`` (on the same device), timed in alternation on the same
    batch so that the machine's drift cancels in the per-repetition ratio.

    Returns:
        :func:`speedup_fields`, ``model``'s ``images_per_s`` with its quartiles, and
        ``reference_images_per_s`` (the reference's median, timed in the same repetitions).
    """
    x, sync = _timing_setup(model, timing, input_size, device)
    with _eval_mode(model, reference):
        t_ref, t = time_calls([lambda: reference(x), lambda: model(x)], timing.warmup, timing.reps, sync)
    return {**speedup_fields(t_ref, t), **Throughput.of(timing.batch_size, t).fields(),
            "reference_images_per_s": round(Throughput.of(timing.batch_size, t_ref).median, 2)}


def speedup_fields(reference: Sequence[float], times: Sequence[float]) -> dict[str, float]:
    """``speedup`` (the median per-repetition ratio ``reference / times``) and its quartiles."""
    r = ratio_stats(reference, times)
    return {"speedup": round(r.median, 4), "speedup_p25": round(r.p25, 4), "speedup_p75": round(r.p75, 4)}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = round(statistics.fmean(values), 3)
    return mean, (round(statistics.pstdev(values), 3) if len(values) > 1 else 0.0)


def result_row(model: nn.Module, metrics: Sequence[dict[str, Any]], fields: dict[str, Any],
               data_config: Optional[dict] = None, throughput: Optional[Throughput] = None) -> ResultRow:
    """One :class:`ResultRow` from the evaluations of one point (averaged over seeds).

    Args:
        model: the model evaluated (name and parameter count).
        metrics: one :func:`~eamvit.methods.evaluate.evaluate` result per seed.
        data_config: the data config the images were built with (``source`` included); ``None``
            leaves those columns blank.
    """
    if not metrics:
        raise EamError("a result row needs at least one evaluation")
    top1, top1_std = _mean_std([m["top1"] for m in metrics])
    top5, top5_std = _mean_std([m["top5"] for m in metrics])
    one = metrics[0] if len(metrics) == 1 else None
    mean = {"top1": top1, "top1_err": one["top1_err"] if one else round(100 - top1, 3), "top5": top5,
            "top5_err": one["top5_err"] if one else round(100 - top5, 3), "num_images": metrics[-1]["num_images"],
            "skipped_images": metrics[-1].get("skipped_images", 0)}
    return ResultRow(**head_row(model, mean, data_config), fields=dict(fields), top1_std=top1_std,
                     top5_std=top5_std, seeds=len(metrics), **(throughput.fields() if throughput is not None else {}))


def run_sweep(model: nn.Module, data: EvalData, points: Sequence[Point], *, timing: Optional[Timing] = None,
              evaluate_fn: Optional[Callable[..., dict]] = None, progress: bool = True,
              desc: str = "sweep") -> list[ResultRow]:
    """Evaluate every point (every seed), restoring the model between points; one row per point.

    Args:
        timing: also time every point (once, with its first seed) with :func:`measure_throughput`.
        evaluate_fn: ``f(model, dataset, indices, batch_size=, workers=, device=, progress=)``
            returning top-1/top-5 (:func:`eamvit.methods.evaluate.evaluate` by default).
        progress: one progress bar over all evaluations, labelled ``desc``.
    """
    bar = tqdm(total=sum(len(p.seeds) for p in points), desc=desc, unit="eval",
               disable=not progress or dist_info()[0] != 0, dynamic_ncols=True)
    rows = []
    try:
        for p in points:
            if not p.seeds:
                raise EamError(f"point {p.fields} has no seeds")
            metrics, measured, speed, evaluated = [], {}, None, model
            for seed in p.seeds:
                bar.set_postfix(**{k: v for k, v in p.fields.items() if isinstance(v, (int, float, str))
                                   and k != "label"}, seed=seed)
                with p.state(model, seed) as applied:
                    applied = applied or Applied()
                    evaluated = applied.model if applied.model is not None else model
                    metrics.append(data.evaluate(evaluated, evaluate_fn))
                    measured = applied.fields
                    if timing is not None and speed is None:
                        speed = measure_throughput(evaluated, timing, device=data.device)
                bar.update(1)
            rows.append(result_row(evaluated, metrics, {**p.fields, **measured}, data.data_config, speed))
    finally:
        bar.close()
    return rows
