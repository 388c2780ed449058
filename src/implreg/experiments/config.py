"""Experiment configurations: frozen dataclasses, ``key=value`` overrides, validation.

Bad input raises :class:`ConfigError` with one sentence naming the problem; the
CLI turns it into exit code 2 before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration problem, stated in one sentence."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_scalar(kind: type, text: str, key: str):
    text = text.strip()
    if kind is bool:
        low = text.lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{key} must be true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            try:
                val = float(text)
            except ValueError:
                raise ConfigError(f"{key} must be an integer, got {text!r}") from None
            if math.isfinite(val) and val == int(val):
                return int(val)
            raise ConfigError(f"{key} must be an integer, got {text!r}") from None
    if kind is float:
        try:
            val = float(text)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {text!r}") from None
        if not math.isfinite(val):
            raise ConfigError(f"{key} must be a finite number, got {text!r}")
        return val
    if kind is str:
        return text
    raise ConfigError(f"{key} has an unsupported type")


def _coerce(kind: Any, value: Any, key: str):
    """Coerce ``value`` (a string from the command line or a JSON value) to ``kind``."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in {"none", ""}):
            return None
        return _coerce(args[0], value, key)
    if origin is tuple:
        inner = typing.get_args(kind)[0]
        if isinstance(value, str):
            parts = [p for p in value.replace("(", "").replace(")", "").split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            parts = [value]
        if not parts:
            raise ConfigError(f"{key} needs at least one value")
        return tuple(_coerce(inner, p, key) for p in parts)
    if isinstance(value, str):
        return _parse_scalar(kind, value, key)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} must be of type {getattr(kind, '__name__', kind)}, got {value!r}")


def with_overrides(cfg: C, pairs: Iterable[str]) -> C:
    """Apply ``key=value`` strings to a frozen dataclass config."""
    types_ = _field_types(type(cfg))
    changes: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key not in types_:
            raise ConfigError(f"unknown key {key!r}; known keys: {', '.join(sorted(types_))}")
        changes[key] = _coerce(types_[key], value, key)
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def from_mapping(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build a config from a mapping (e.g. a ``config.json``), refusing unknown keys."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in the configuration")
    return cls(**{k: _coerce(types_[k], v, k) for k, v in data.items()})


def to_mapping(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)
