"""Calibration data given as a ``forward_loop(model)`` callable (as NVIDIA Model Optimizer's ``quantize``).

When the calibration data is not a classification folder (a detection or segmentation model whose
backbone is a timm transformer, inputs that are dicts, a data pipeline of the user's own), the user
passes a callable that runs ``model`` over the calibration data; eamvit calls it with the model it
is calibrating and observes whatever that runs. It must feed the same data, in the same order, each
time it is called (entropy maps split over several passes call it once per pass).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from eamvit.errors import EamError
from eamvit.modules.attention import layer_shapes

ForwardLoop = Callable[[nn.Module], Any]


class _FirstForwardDone(Exception):
    """Raised from the model's forward hook to stop a forward loop after its first forward."""


def check_forward_loop(data: Any, forward_loop: Optional[ForwardLoop], data_name: str) -> None:
    """Refuse, in one line, no calibration data, both kinds at once, or a forward loop that is not callable.

    Args:
        data: the calibration data given the other way (a dataset, images).
        forward_loop: the callable, or None.
        data_name: the name of the other argument, for the message.
    """
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


@contextlib.contextmanager
def counting_forwards(model: nn.Module) -> Iterator[list[int]]:
    """Count the completed forwards of ``model`` inside the block (``counter[0]``)."""
    counter = [0]

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        counter[0] += 1

    handle = model.register_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def run_forward_loop(model: nn.Module, forward_loop: ForwardLoop) -> int:
    """``forward_loop(model)``; returns how many forwards of ``model`` it ran (refuses none)."""
    with counting_forwards(model) as n:
        forward_loop(model)
    if not n[0]:
        raise EamError("forward_loop(model) never called the model it was given; it must run that model "
                       "over the calibration data")
    return n[0]


def run_first_forward(model: nn.Module, forward_loop: ForwardLoop, *, before: bool = False) -> int:
    """Run ``forward_loop(model)`` until the first forward of ``model`` has completed, then stop it.

    Args:
        model: the module the loop is given.
        forward_loop: ``f(model)``.
        before: stop the loop as that forward starts instead, without running it (to read its batch size).

    Returns:
        The batch size of that forward when its first input is a tensor, else 0.
    """
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
    if not seen:
        raise EamError("forward_loop(model) never called the model it was given; it must run that model "
                       "over the calibration data")
    return seen[0]


def loop_layer_shapes(model: nn.Module, forward_loop: ForwardLoop) -> list[tuple[int, ...]]:
    """Per-layer attention shapes (as :func:`~eamvit.modules.attention.layer_shapes`) from the first
    forward a forward loop runs."""
    return layer_shapes(model, lambda: run_first_forward(model, forward_loop))
