"""Experiment configurations: frozen dataclasses checked declaratively in one place.

A configuration is a frozen dataclass.  Choices are ``Literal`` types (alone
or in tuples); bounds and lengths are field metadata set with :func:`param`::

    @dataclass(frozen=True)
    class Config:
        rank: int = param(1000, ge=1, doc="components R of the factorization")
        loss: Literal["l2", "huber"] = "l2"
        init_stds: tuple[float, ...] = param((0.05,), gt=0)

:func:`check` enforces types, choices, bounds and lengths for every field;
cross-field rules stay in the config's optional ``check(self)`` method.  Bad
input raises :class:`ConfigError` with one sentence naming the key; the CLI
turns it into exit code 2 before any work starts.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

C = TypeVar("C")

MAX_INT = 2**63 - 1


class ConfigError(ValueError):
    """A configuration problem, stated in one sentence."""


def param(
    default: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    min_len: int = 1,
    max_len: int | None = None,
    unique: bool = False,
    doc: str = "",
) -> Any:
    """A config field with bounds (on the value, or on every value of a tuple) and a doc line."""
    meta = {"gt": gt, "ge": ge, "lt": lt, "le": le, "min_len": min_len}
    meta.update({"max_len": max_len, "unique": unique, "doc": doc})
    return dataclasses.field(default=default, metadata=meta)


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _bounds_text(meta: Mapping[str, Any]) -> str:
    """'positive', 'in [0, 1)', '>= 2' ... for messages and ``implreg show``."""
    gt, ge, lt, le = (meta.get(k) for k in ("gt", "ge", "lt", "le"))
    lo = f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else None
    hi = f"{lt:g})" if lt is not None else f"{le:g}]" if le is not None else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if gt == 0:
        return "positive"
    if ge == 0:
        return "non-negative"
    if lo:
        return (">" if gt is not None else ">=") + " " + lo[1:]
    if hi:
        return ("<" if lt is not None else "<=") + " " + hi[:-1]
    return ""


def _in_bounds(x: float, meta: Mapping[str, Any]) -> bool:
    return not (
        (meta.get("gt") is not None and not x > meta["gt"])
        or (meta.get("ge") is not None and not x >= meta["ge"])
        or (meta.get("lt") is not None and not x < meta["lt"])
        or (meta.get("le") is not None and not x <= meta["le"])
    )


def type_name(kind: Any) -> str:
    """A short readable name of a field type: ``int``, ``tuple[float, ...]``, ``str | None``."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "str"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(kind))
    if origin is tuple:
        return f"tuple[{type_name(typing.get_args(kind)[0])}, ...]"
    return "None" if kind is type(None) else getattr(kind, "__name__", str(kind))


def choices(kind: Any) -> tuple | None:
    """The allowed values of a ``Literal`` field (or of a tuple of ``Literal``)."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        return choices(typing.get_args(kind)[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return choices(inner[0]) if inner else None
    return typing.get_args(kind) if origin is Literal else None


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
            val = int(text)
        except ValueError:
            # "2e9" is an integer written as a float: take it exactly (Decimal), or refuse it
            try:
                num = decimal.Decimal(text.strip())
            except decimal.InvalidOperation:
                raise ConfigError(f"{key} must be an integer, got {text!r}") from None
            if not num.is_finite() or num != num.to_integral_value() or abs(num) > MAX_INT:
                if num.is_finite() and num == num.to_integral_value():
                    raise ConfigError(f"{key} is too large, got {text.strip()}") from None
                raise ConfigError(f"{key} must be an integer, got {text!r}") from None
            val = int(num)
        return _coerce(int, val, key)
    if kind is float:
        try:
            val = float(text)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {text!r}") from None
        return _coerce(float, val, key)
    if kind is str:
        return text
    raise ConfigError(f"{key} has an unsupported type")


def _coerce(kind: Any, value: Any, key: str):
    """Coerce ``value`` (a string from the command line or a JSON / Python value) to ``kind``."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in {"none", ""}):
            return None
        return _coerce(args[0], value, key)
    if origin is Literal:
        allowed = typing.get_args(kind)
        text = value.strip() if isinstance(value, str) else value
        if text not in allowed:
            raise ConfigError(
                f"{key} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
            )
        return text
    if origin is tuple:
        inner = typing.get_args(kind)[0]
        if isinstance(value, str):
            parts = [p for p in value.replace("(", "").replace(")", "").split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            parts = [value]
        return tuple(_coerce(inner, p, key) for p in parts)
    if isinstance(value, str):
        return _parse_scalar(kind, value, key)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)  # 2e9 from Python or JSON: an integer written as a float, exactly
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_INT:
            try:
                shown = f"{float(value):.3g}"
            except OverflowError:
                shown = f"a number of {len(str(abs(value)))} digits"
            raise ConfigError(f"{key} is too large, got {shown}")
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} must be of type {type_name(kind)}, got {value!r}")


def check(cfg: Any) -> None:
    """Check every field of ``cfg`` (type, choices, bounds, length), then ``cfg.check()``."""
    hints = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        key, value, meta = f.name, getattr(cfg, f.name), f.metadata
        _coerce(hints[key], value, key)  # types and choices
        if value is None:
            continue
        if isinstance(value, tuple):
            if len(value) < meta.get("min_len", 1):
                need = meta.get("min_len", 1)
                raise ConfigError(f"{key} needs at least {need} value{'s' * (need > 1)}")
            if meta.get("max_len") is not None and len(value) > meta["max_len"]:
                raise ConfigError(f"{key} takes at most {meta['max_len']} values, got {len(value)}")
            if meta.get("unique") and len(set(value)) != len(value):
                raise ConfigError(f"{key} repeats a value: {list(value)}")
            bad = [v for v in value if isinstance(v, (int, float)) and not _in_bounds(v, meta)]
            if bad:
                raise ConfigError(
                    f"every value of {key} must be {_bounds_text(meta)}, got {list(value)}"
                )
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not _in_bounds(value, meta):
                raise ConfigError(f"{key} must be {_bounds_text(meta)}, got {value}")
    extra = getattr(cfg, "check", None)
    if callable(extra):
        extra()


def describe(cfg: Any) -> list[dict[str, str]]:
    """One row per key: name, type, value, allowed values, bounds, doc (for ``implreg show``).

    The keys a config class declares itself come first, then those of the option
    classes it inherits (``GDOptions``, ``FlowOptions``), each group in declaration order.
    """
    hints = field_types(type(cfg))
    own = type(cfg).__dict__.get("__annotations__", {})
    by_name = {f.name: f for f in dataclasses.fields(cfg)}
    ordered = [by_name[k] for k in own if k in by_name]
    rows = []
    for f in ordered + [f for k, f in by_name.items() if k not in own]:
        allowed = choices(hints[f.name])
        value = getattr(cfg, f.name)
        rows.append(
            {
                "key": f.name,
                "type": type_name(hints[f.name]),
                "value": ",".join(map(str, value)) if isinstance(value, tuple) else str(value),
                "allowed": ", ".join(allowed) if allowed else "",
                "bounds": _bounds_text(f.metadata),
                "doc": f.metadata.get("doc", ""),
            }
        )
    return rows


def with_overrides(cfg: C, pairs: Iterable[str] | Mapping[str, Any]) -> C:
    """Apply ``key=value`` strings (or a mapping of Python values) to a frozen dataclass config.

    A key given twice is refused, not silently resolved.
    """
    types_ = field_types(type(cfg))
    changes: dict[str, Any] = {}
    items: list[tuple[str, Any]] = []
    if isinstance(pairs, Mapping):
        items = list(pairs.items())
    else:
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError(f"--set expects key=value, got {pair!r}")
            key, value = pair.split("=", 1)
            items.append((key.strip(), value))
    for key, value in items:
        if key not in types_:
            raise ConfigError(f"unknown key {key!r}; known keys: {', '.join(sorted(types_))}")
        if key in changes:
            raise ConfigError(f"the key {key!r} is set twice")
        changes[key] = _coerce(types_[key], value, key)
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def from_mapping(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build a config from a mapping (e.g. a ``config.json``), refusing unknown keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a configuration must be a JSON object, got {type(data).__name__}")
    types_ = field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in the configuration")
    return cls(**{k: _coerce(types_[k], v, k) for k, v in data.items()})


def to_mapping(cfg: Any) -> dict[str, Any]:
    """The fields of a dataclass as a dict (nested dataclasses as dicts too)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = to_mapping(value) if dataclasses.is_dataclass(value) else value
    return out


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)
