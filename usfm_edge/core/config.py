"""Dataclass config helpers: build from dicts/YAML, reject unknown keys with a suggestion."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from usfm_edge.core.errors import ConfigError

T = TypeVar("T")


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(choices))}"


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type where that is unambiguous."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(value, args[0], name)
        return value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list, got {value!r}")
        sub = typing.get_args(hint)
        if origin is tuple and sub and sub[-1] is not Ellipsis:
            return tuple(_coerce(v, t, name) for v, t in zip(value, sub))
        item = sub[0] if sub else Any
        conv = [_coerce(v, item, name) for v in value]
        return tuple(conv) if origin is tuple else conv
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        if hint is str and isinstance(value, Path):
            return str(value)
        raise ConfigError(f"'{name}={value!r}' has type {type(value).__name__}, expected {hint.__name__}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError with a suggestion."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key '{key}' for {cls.__name__}: {_suggest(key, fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints.get(k, Any), k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain dict of JSON/YAML-safe values (tuples become lists)."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(obj)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping raises ConfigError naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path=path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=path) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of key: value", path=path)
    return data


def merge(cls: type[T], *layers: dict[str, Any] | None) -> T:
    """Merge dicts left to right (later wins, None values skipped) and build ``cls``."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            if v is not None:
                out[k] = v
    return from_dict(cls, out)
