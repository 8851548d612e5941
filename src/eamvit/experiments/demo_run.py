"""What the demo's steps share (:class:`DemoRun`), what a step is (:class:`Step`) and the figures it asks for."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from eamvit.experiments.digits import DEMO_KWARGS
from eamvit.experiments.runner import EvalData
from eamvit.methods.calibrate import EntropyMaps
from eamvit.methods.data import DigitsDataset, digits_data_config


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class DemoRun:
    """What the steps share: inputs, the results so far, and where the files go.

    Args:
        train: the digits training split (calibration, fine-tuning).
        test: the held-out split (every top-1).
        full: run the ``--full`` steps too.
    """

    out: Path
    ckpt: Path
    model: nn.Module
    train: DigitsDataset
    test: DigitsDataset
    device: torch.device | str
    full: bool = False
    base: dict[str, Any] = field(default_factory=dict)
    maps: Optional[EntropyMaps] = None
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def data_config(self) -> dict[str, Any]:
        """The digits' preprocessing, as every row records it (``data_config_source`` ``digits``)."""
        return {**digits_data_config(DEMO_KWARGS["img_size"]), "source": "digits"}

    @property
    def eval_data(self) -> EvalData:
        """The held-out digits, as every step evaluates them."""
        return EvalData(self.test, batch_size=256, device=self.device, data_config=self.data_config)


@dataclass
class Figure:
    """A figure a step asks for; the caller of :func:`run_demo` draws it (experiments sit below plots).

    Args:
        plot: which plot function, by its name in :mod:`eamvit.plots` (e.g. ``"plot_sweep"``).
        args: its positional arguments (the PNG path among them).
    """

    plot: str
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One step of the demo.

    Args:
        name: its key in the results (and the stem of its CSV/JSON files, where it writes a table).
        title: what the ``[k/N]`` line says.
        run: ``run(demo)``: does the work; returns the section ``{"rows", "table", "markdown"}`` for
            stdout and ``report.md`` (and ``"figures"``: the :class:`Figure` list it asks for), or
            ``None`` for a step without a table.
        full: only with ``--full``.
        more: what ``--full`` adds to a step that the default demo runs in part.
    """

    name: str
    title: str
    run: Callable[[DemoRun], Optional[dict[str, Any]]]
    full: bool = False
    more: str = ""
