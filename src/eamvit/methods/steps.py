"""The registry of recipe steps: one :class:`StepHandler` per config type (a new step is one config and one
handler, and no edit anywhere else)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from eamvit.config import Config
from eamvit.errors import EamError


@dataclass(frozen=True)
class StepInputs:
    """What applying a step may read (never saved); the fields are :func:`~eamvit.methods.recipe.apply_`'s.

    Args:
        target: the deployment target of the recipe (an export config), ``None``: PyTorch.
    """

    calib: Any = None
    maps: Any = None
    device: torch.device | str | None = None
    progress: bool = False
    checkpoint_dir: Optional[str | os.PathLike] = None
    target: Any = None


@dataclass(frozen=True)
class StepHandler:
    """What a step registers.

    Args:
        stage: the step's place in a recipe (``"quant"``, ``"freeze"``, ``"prune"`` ...), run by ``order``
            (lower first); a recipe holds at most one step of each stage.
        content: ``f(model, config) -> (tensors, metadata)``: the state the step added beyond its
            config; ``None``: the config alone rebuilds it.
        restore: ``f(model, config, metadata, tensors, path)``: rebuild the step on a fresh model from
            its config and :attr:`content` (checking that they agree).
        export: ``f(model, config, export_config)``: raise :class:`EamError` where the step has no form
            in that export; ``None``: every form carries it.
        method: what the stage's own verb dispatches to for this config type (quantization: the
            method's :class:`~eamvit.methods.quant_registry.QuantizeHandler`); ``None``: nothing.
    """

    stage: str
    order: int
    apply: Callable[[nn.Module, Any, StepInputs], Any]
    restore: Callable[[nn.Module, Any, dict[str, Any], dict[str, torch.Tensor], str], None]
    content: Optional[Callable[[nn.Module, Any], tuple[dict[str, torch.Tensor], dict[str, Any]]]] = None
    export: Optional[Callable[[nn.Module, Any, Any], None]] = None
    method: Any = None


_STEPS: dict[type, StepHandler] = {}


def register_step(config_type: type[Config], handler: StepHandler) -> None:
    """Make ``config_type`` a recipe step applied by ``handler`` (refused when its ``KIND`` is taken)."""
    for other in _STEPS:
        if other.KIND == config_type.KIND and other is not config_type:
            raise EamError(f"step kind {config_type.KIND!r} is registered already (by {other.__name__})")
    _STEPS[config_type] = handler


def handler_of(config: Any) -> StepHandler:
    """The handler registered for ``config``'s type (or a base class of it)."""
    for cls in type(config).__mro__:
        if cls in _STEPS:
            return _STEPS[cls]
    raise EamError(f"{type(config).__name__} is not a recipe step; steps are {', '.join(step_kinds())}")


def step_kinds() -> list[str]:
    """Every registered step's ``KIND``, in recipe order."""
    return [cls.KIND for cls, h in sorted(_STEPS.items(), key=lambda kv: (kv[1].order, kv[0].KIND))]


def step_types(stage: str) -> list[type[Config]]:
    """The config types registered for ``stage``, in the order they were registered."""
    return [cls for cls, h in _STEPS.items() if h.stage == stage]


def config_of_kind(kind: Any) -> type[Config]:
    """The config class stored under ``kind`` in files and recipes."""
    for cls in _STEPS:
        if isinstance(kind, str) and cls.KIND == kind:
            return cls
    raise EamError(f"recipe step kind {kind!r} is not one of {', '.join(step_kinds())}")


def stages() -> list[str]:
    """Every registered stage, in recipe order."""
    return sorted({h.stage: h.order for h in _STEPS.values()}, key=stage_order)


def stage_order(stage: str) -> int:
    """Where ``stage`` runs in a recipe."""
    for h in _STEPS.values():
        if h.stage == stage:
            return h.order
    raise EamError(f"no recipe step has the stage {stage!r}")
