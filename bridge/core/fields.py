"""Documented settings fields and the check that builds a frozen dataclass from a TOML table.

A field says once what it means (``metadata["doc"]``) and what values it takes (``min``, ``max``,
``gt``, ``choices``); ``bridge/config.py`` declares the settings with ``setting()`` and builds
them with ``build()``, which collects every problem (naming the key and a close spelling of an
unknown one) instead of stopping at the first.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import field
from typing import Any


def setting(default: Any, doc: str, **rules: Any) -> Any:
    """A documented field. ``rules``: ``min``, ``max`` (inclusive), ``choices``, ``gt`` (exclusive)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **rules})
    return field(default=default, metadata={"doc": doc, **rules})


def type_name(tp: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return "a string"
    return names.get(base, str(base))


def check_value(key: str, value: Any, tp: Any, meta: dict[str, Any]) -> tuple[Any, str | None]:
    """Coerce ``value`` to ``tp`` or return an error text for ``key``."""
    optional = isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if optional else tp
    ok = False
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif base is str:
        ok = isinstance(value, str)
    elif isinstance(base, type) and issubclass(base, enum.Enum):
        # Spelled as a string in TOML; an unknown spelling is reported by the choices rule below.
        ok = isinstance(value, str)
        if ok and value in base._value2member_map_:
            value = base(value)
    if not ok:
        return value, f"{key} must be {type_name(tp)}, not {value!r}"
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        return value, f"{key} must be one of {allowed}, not {value!r}"
    if "min" in meta and value < meta["min"]:
        return value, f"{key} must be at least {meta['min']}, not {value!r}"
    if "max" in meta and value > meta["max"]:
        return value, f"{key} must be at most {meta['max']}, not {value!r}"
    if "gt" in meta and value <= meta["gt"]:
        return value, f"{key} must be greater than {meta['gt']}, not {value!r}"
    return value, None


def unknown_key(key: str, where: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
    return f"unknown key {key!r} in {where}{hint}"


def build(cls: type, table: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(table, dict):
        problems.append(f"{where} must be a table")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            problems.append(unknown_key(key, where, list(fields)))
            continue
        label = f"{where}.{key}" if not where.startswith("[[") else f"{key} in {where}"
        value, err = check_value(label, value, hints[key], dict(fields[key].metadata))
        if err:
            problems.append(err)
        else:
            values[key] = value
    return cls(**values)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
