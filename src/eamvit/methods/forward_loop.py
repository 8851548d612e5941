"""Calibration data given as a ``forward_loop(model)`` callable (as NVIDIA Model Optimizer's ``quantize``)
that runs the model over the data: it must feed the same data, in the same order, at every call."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from eamvit.errors import EamError
from eamvit.modules.attention import layer_shapes

ForwardLoop = Callable[[nn.Module], Any]


class _FirstForwardDone(Exception):
    """Raised from the model's forward hook to stop a forward loop after its first forward."""


def check_forward_loop(data: Any, forward_loop: Optional[ForwardLoop], data_name: str) -> None:
    """Refuse no calibration data, both kinds (``data`` is named ``data_name``), or a forward loop not callable."""
    if forward_loop is None:
        if data is None:
            raise EamError(f"calibration needs data: give {data_name} or forward_loop=f, where f(model) runs the model "
                           "over the calibration data")
        return
    if data is not None:
        raise EamError(f"give either {data_name} or forward_loop, not both")
    if not callable(forward_loop):
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


def loop_layer_shapes(model: nn.Module, forward_loop: ForwardLoop) -> list[tuple[int, ...]]:
    """Per-layer attention shapes (as :func:`~eamvit.modules.attention.layer_shapes`) of the loop's first forward."""
    return layer_shapes(model, lambda: run_first_forward(model, forward_loop))
