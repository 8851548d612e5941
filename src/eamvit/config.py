"""The one config base: dataclass settings with a versioned ``to_dict`` / ``from_dict`` round trip.

Every setting that is saved with an artifact (quantized states, maps, pruned or fine-tuned models)
is a :class:`Config`. Runtime settings (device, progress bars, checkpoint folders) are *not* fields
of a saved config: they are arguments of the function that runs the work, so a file written on a
GPU loads on a CPU and two runs that differ only in where they ran save the same config.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar, TypeVar

from eamvit.errors import EamError

C = TypeVar("C", bound="Config")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return value


def _tuple_fields(cls: type) -> set[str]:
    """Fields annotated as tuples: JSON gives them back as lists."""
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name)
        origins = {typing.get_origin(tp)} | {typing.get_origin(a) for a in typing.get_args(tp)}
        if tp is tuple or tuple in origins:
            out.add(f.name)
    return out


def _untuple(value: Any) -> Any:
    return tuple(_untuple(v) for v in value) if isinstance(value, list) else value


class Config:
    """Base class of eamvit's dataclass configs.

    Subclasses are dataclasses that set ``KIND`` (the name stored in files) and ``VERSION`` (raised
    when a field changes meaning), and override :meth:`validate` to raise :class:`EamError` on a bad
    value. Float infinity is written as ``"inf"`` (JSON has no infinity). The base itself is not a
    dataclass (it has no fields), so a subclass may be frozen or not: ``dataclasses`` refuses to mix
    the two along one line of dataclass bases.
    """

    KIND: ClassVar[str] = "config"
    VERSION: ClassVar[int] = 1

    def validate(self: C) -> C:
        """Check the values; returns ``self`` so calls chain. Subclasses override it."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "version", **fields}``, JSON-ready (tuples as lists)."""
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"kind": self.KIND, "version": self.VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """The config ``to_dict`` wrote, validated.

        Raises:
            EamError: another kind of config, a newer version, or a field this version does not know.
        """
        if not isinstance(d, dict):
            raise EamError(f"a {cls.KIND} config must be a JSON object, not {type(d).__name__}")
        kind, version = d.get("kind", cls.KIND), d.get("version", 1)
        if kind != cls.KIND:
            raise EamError(f"expected a {cls.KIND} config, found a {kind} config")
        if not isinstance(version, int) or version > cls.VERSION:
            raise EamError(f"{cls.KIND} config version {version} is newer than this eamvit understands "
                           f"(version {cls.VERSION}); upgrade eamvit")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"kind", "version"})
        if unknown:
            raise EamError(f"{cls.KIND} config has unknown field(s) {', '.join(unknown)}; "
                           "it was written by another eamvit version")
        tuples = _tuple_fields(cls)
        kw = {k: (_untuple(v) if k in tuples else v) for k, v in d.items() if k in names}
        kw = {k: (float("inf") if v == "inf" else v) for k, v in kw.items()}
        return cls(**kw).validate()
