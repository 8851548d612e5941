"""The one object a model carries for eamvit: ``model.eam_state``, a :class:`ModelState`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

ATTR = "eam_state"


@dataclass
class ModelState:
    """What eamvit records about one model.

    Args:
        data_config: its own preprocessing (a checkpoint's, a state's or the user's overrides); ``None``: timm's.
        calibration: records of every image set that calibrated it, so that evaluation never scores them.
        fp_sha256: digest of the full-precision weights a quantization was made from.
        steps: the config of each step applied (``reports``: its report), by stage.
        target: the deployment target the model was prepared for (an export config), ``None``: none.
    """

    VERSION: ClassVar[int] = 1

    spec: Any = None
    data_config: Optional[dict[str, Any]] = None
    calibration: list[dict[str, Any]] = field(default_factory=list)
    fp_sha256: Optional[str] = None
    steps: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)
    prune: Any = None
    merge: Any = None
    target: Any = None


def state_of(model: Any) -> ModelState:
    """``model``'s :class:`ModelState`, created empty on first use."""
    return model.__dict__.setdefault(ATTR, ModelState())


def peek(model: Any) -> Optional[ModelState]:
    """``model``'s :class:`ModelState`, or ``None`` where it has none (nothing is created)."""
    return getattr(model, "__dict__", {}).get(ATTR)


def step_config(model: Any, stage: str) -> Any:
    """The config of the ``stage`` step applied to ``model`` (``"quant"``, ``"prune"`` ...), or ``None``."""
    st = peek(model)
    return None if st is None else st.steps.get(stage)
