"""Typed values of config sections: a YAML value checked against its dataclass field's annotation.

`_build_section` builds one section dataclass from a mapping, checking each value with `_coerce` (Literal choices,
unions, lists, mappings, bool/int/float/str, nested dataclasses) and then the section's own `validate()`;
`check_range` is the range check those `validate` methods use. Every error is a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

from nova_rt.errors import ConfigError

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def check_range(name: str, value: float, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None) -> None:
    """ValueError `name: must be ...` unless value is finite and within the bounds (for `validate` methods)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le)
    if not ok:
        bounds = [f">= {ge}" if ge is not None else "", f"> {gt}" if gt is not None else "",
                  f"<= {le}" if le is not None else ""]
        raise ValueError(f"{name}: must be a finite number {' and '.join(b for b in bounds if b)}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and str(value).lower() in choices:  # YAML reads a bare true / false as a bool
            value = str(value).lower()
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        raise ConfigError(f"{where}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):  # YAML 1.1 reads `5e-5` as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build_section(tp, value, where)
    else:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build_section(cls: type, values: dict, where: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    removed = getattr(cls, "removed_key", None)  # a key the section dropped, with what to write instead
    for key in unknown if removed is not None else ():
        if (msg := removed(key, values[key])) is not None:
            raise ConfigError(f"{where.rsplit(': ', 1)[0]}: {msg}")
    if unknown:
        raise ConfigError(f"{where}: unknown key '{where.split(': ')[-1]}.{unknown[0]}' "
                          f"(valid keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            msg = str(exc)  # "section.key: ..." already names the key: prefix only the file
            section = where.split(": ")[-1]
            prefix = where.rsplit(": ", 1)[0] if msg.startswith(section + ".") and ": " in where else where
            raise ConfigError(f"{prefix}: {msg}") from None
    return obj
