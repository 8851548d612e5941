"""The one config base: frozen dataclass settings, checked when built, with a versioned ``to_dict`` /
``from_dict`` round trip. See docs/architecture-core.md."""
from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Any, ClassVar, TypeVar

from eamvit.errors import EamError

C = TypeVar("C", bound="Config")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Config):  # a config field of a config (the sweeps' settings)
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return value


def _unjson(value: Any) -> Any:
    """``"inf"`` back to infinity, in lists too."""
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    return float("inf") if value == "inf" else value


def _untuple(value: Any) -> Any:
    return tuple(_untuple(v) for v in value) if isinstance(value, list) else value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation, evaluated (annotations are strings in eamvit's modules)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_tuple_type(tp: Any) -> bool:
    """``tp`` is a tuple annotation or an ``Optional`` of one (JSON gives such fields back as lists)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_tuple_type(a) for a in typing.get_args(tp))
    return tp is tuple or typing.get_origin(tp) is tuple


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the type annotation ``tp`` (an int is a float; a bool is not an int)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is None or tp is type(None):
        return value is None
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:  # by type too: True == 1 but True is not the choice 1
        return any(type(value) is type(a) and value == a for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is tuple or origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args)))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    raise TypeError(f"config annotation {tp!r} is not one the Config base checks")


_PLURAL = {int: "ints", float: "numbers", bool: "bools", str: "strings"}


def _describe(tp: Any, plural: bool = False) -> str:
    """``tp`` in words: ``"an int"``, ``"one of head, layer, global"``, ``"a tuple of numbers"``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(a, plural) for a in args if a is not type(None)) or "None"
    if origin is typing.Literal:
        return ("values among " if plural else "one of ") + ", ".join(map(str, args))
    if tp is tuple or origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_describe(args[0], plural=True)}" if not plural else "tuples"
        inner = f" ({', '.join(getattr(a, '__name__', str(a)) for a in args)})" if args else ""
        return ("tuples" if plural else "a tuple") + inner
    if tp in _PLURAL:
        return _PLURAL[tp] if plural else {int: "an int", float: "a number", bool: "true or false",
                                           str: "a string"}[tp]
    name = getattr(tp, "__name__", str(tp))
    return f"{name} objects" if plural else f"a {name}"


def _given(value: Any) -> str:
    """What was given, for an error message: ``"the string '4'"``, ``"the bool True"``."""
    if value is None:
        return "None"
    if isinstance(value, Config):
        return f"{'an' if value.KIND[:1] in tuple('aeiou') else 'a'} {value.KIND} config"
    name = {bool: "bool", int: "int", float: "number", str: "string"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"the {name} {text if len(text) <= 60 else text[:57] + '...'}"


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class of eamvit's configs, frozen dataclasses that cannot hold a bad value: subclasses set
    ``KIND`` (the name stored in files) and ``VERSION`` (raised when a field changes meaning)."""

    KIND: ClassVar[str] = "config"
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = _field_types(type(self))[f.name]
            if isinstance(value, list) and _is_tuple_type(tp):  # a list given for a tuple: keep it hashable
                value = _untuple(value)
                object.__setattr__(self, f.name, value)
            if not _matches(value, tp):
                raise EamError(f"{self.KIND} config field {f.name} must be {_describe(tp)}, not {_given(value)}")
        self._check()

    def _check(self) -> None:
        """Range checks (:class:`EamError`) and normalisation of the typed fields, stored with
        ``object.__setattr__``; subclasses override it (call ``super()``)."""

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "version", **fields}``, JSON-ready (tuples as lists)."""
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"kind": self.KIND, "version": self.VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """The config ``to_dict`` wrote, checked as any constructed config is; refused when it is another
        kind of config, a newer version, or has a field this version does not know."""
        if not isinstance(d, dict):
            raise EamError(f"a {cls.KIND} config must be a JSON object, not {type(d).__name__}")
        kind, version = d.get("kind", cls.KIND), d.get("version", 1)
        if kind != cls.KIND:
            raise EamError(f"expected a {cls.KIND} config, found a {kind} config")
        if isinstance(version, bool) or not isinstance(version, int) or version > cls.VERSION:
            raise EamError(f"{cls.KIND} config version {version} is newer than this eamvit understands "
                           f"(version {cls.VERSION}); upgrade eamvit")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"kind", "version"})
        if unknown:
            raise EamError(f"{cls.KIND} config has unknown field(s) {', '.join(unknown)}; "
                           "it was written by another eamvit version")
        # JSON lists become tuples in __post_init__
        return cls(**{k: _unjson(v) for k, v in d.items() if k in names})
