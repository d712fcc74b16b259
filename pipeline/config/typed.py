"""Build frozen dataclasses from plain mappings, checking every key and value against type hints.

The machinery behind ``pipeline.config.load.load_config``: it knows nothing of the audit itself.
Each error is a ``ConfigError`` naming the full dotted key, so a typo deep in a YAML file points at
its line's key, and an unknown key lists the allowed ones with a "did you mean".
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

__all__ = ["ConfigError", "build", "check_key", "fail", "to_plain"]


class ConfigError(ValueError):
    """An invalid configuration; ``key`` is the full dotted key (``occlusion.window``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def fail(key: str, message: str) -> NoReturn:
    """Raise ``ConfigError(key, message)``; for checks in ``__post_init__`` (key relative)."""
    raise ConfigError(key, message)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else prefix or key


def _did_you_mean(name: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


_NOUNS = {int: "integer", float: "number", str: "string"}


def _describe(tp: Any) -> str:
    """Human words for a type hint, used in error messages."""
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (dict, Mapping):
        return "a mapping"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        noun = _NOUNS.get(args[0], "value")
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {noun}s"
        return f"a list of {len(args)} {noun}s"
    if tp in _NOUNS:
        return ("an " if tp is int else "a ") + _NOUNS[tp]
    return "true or false" if tp is bool else getattr(tp, "__name__", str(tp))


def _scalar(value: Any, tp: type, key: str) -> Any:
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    if tp is str and isinstance(value, str):
        return value
    hint = "; quote it in YAML" if tp is str and isinstance(value, (int, float)) else ""
    fail(key, f"must be {_describe(tp)}, got {value!r} ({type(value).__name__}){hint}")


def convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and convert it (lists -> tuples, str -> Enum).

    Raises:
        ConfigError: naming ``key`` and the offending value.
    """
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        fail(key, f"must be {_describe(tp)}, got {value!r}")
    if value is None:
        fail(key, f"must be {_describe(tp)}, got null")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)  # type: ignore[arg-type]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if value not in allowed:
            hint = _did_you_mean(str(value), allowed)
            fail(key, f"{value!r} is not {_describe(tp)}{hint}")
        return tp(value)
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            fail(key, f"must be a mapping with string keys, got {value!r}")
        return dict(value)
    if origin is tuple:
        args = typing.get_args(tp)
        variadic = len(args) == 2 and args[1] is Ellipsis
        if variadic and not isinstance(value, (list, tuple)):
            value = [value]  # a single value stands for a one-element list
        if not isinstance(value, (list, tuple)):
            fail(key, f"must be {_describe(tp)}, got {value!r}")
        if not variadic and len(value) != len(args):
            fail(key, f"must be {_describe(tp)}, got {len(value)} entries: {list(value)!r}")
        items = [args[0]] * len(value) if variadic else list(args)
        pairs = enumerate(zip(value, items, strict=True))
        return tuple(convert(v, t, f"{key}[{i}]") for i, (v, t) in pairs)
    return _scalar(value, tp, key)


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from a mapping, validating every key.

    Args:
        cls: a (frozen) dataclass whose ``__post_init__`` may raise ``ConfigError`` with keys
            relative to it.
        data: mapping of field name to raw (YAML) value.
        prefix: dotted key of ``data`` within the whole config, for messages.

    Returns:
        The instance.
    """
    if not isinstance(data, Mapping):
        fail(prefix, f"must be a mapping of {', '.join(_field_names(cls))}, got {data!r}")
    names = _field_names(cls)
    for k in data:
        if k not in names:
            hint = _did_you_mean(str(k), names)
            fail(_join(prefix, str(k)), f"unknown key; allowed keys: {', '.join(names)}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = convert(data[f.name], _hints(cls)[f.name], _join(prefix, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fail(_join(prefix, f.name), "is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_join(prefix, e.key), e.message) from None
    except ValueError as e:
        # A value type of another layer (a Hub file) checks itself; its messages start with the
        # field they are about.
        field_name, _, rest = str(e).partition(" ")
        if field_name in names and rest:
            raise ConfigError(_join(prefix, field_name), rest) from None
        raise ConfigError(prefix, str(e)) from None


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def check_key(cls: type, dotted: str) -> None:
    """Check that ``dotted`` (``occlusion.window``) names a field reachable from ``cls``.

    Keys below a mapping-typed field (``model.kwargs.num_classes``) are free.

    Raises:
        ConfigError: the first unknown part, with the allowed keys at that level.
    """
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        # Optional sections (``normalize: NormalizeConfig | None``) are dataclasses too.
        if _is_union(tp):
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if typing.get_origin(tp) in (dict, Mapping):
            return
        if not dataclasses.is_dataclass(tp):
            fail(here, f"unknown key: {'.'.join(parts[:i])} is a value, not a section")
        names = _field_names(tp)  # type: ignore[arg-type]
        if part not in names:
            hint = _did_you_mean(part, names)
            fail(here, f"unknown key; allowed keys: {', '.join(names)}{hint}")
        tp = _hints(tp)[part]  # type: ignore[arg-type]


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, enums -> values, tuples -> lists: JSON- and YAML-serialisable."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj
