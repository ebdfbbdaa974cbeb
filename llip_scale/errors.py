"""Configuration errors and the checks every config section shares: a leaf module.

``ConfigError`` is what every config problem raises (one line naming the key and the fix);
``from_dict`` builds a dataclass from a plain dict with type checks, ``validate_tree`` runs the
``validate(name)`` of every node and checks the path fields. The section configs next to their
code (model, data, pairs, launchers) import this module, and nothing here imports them.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A configuration problem, reported before any compute happens."""


def check(ok: bool, message: str) -> None:
    """Raise a ConfigError with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def path_field(default: str = "", kind: str = "file") -> Any:
    """A string field naming a file or folder that must exist when it is set."""
    return field(default=default, metadata={"path": kind})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if tp in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if (tp is tuple or origin is tuple) else items
    if tp in (dict,) or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. launcher.time=90 (minutes), a numeric partition name
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else \
                f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list form of a dataclass tree (YAML-safe)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def validate_tree(cfg: Any, name: str) -> None:
    """Check the path fields and run ``validate(name)`` of ``cfg`` and of every dataclass below it."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        full = f"{name}.{f.name}" if name else f.name
        kind = f.metadata.get("path")
        if kind and value:
            ok = Path(value).is_dir() if kind == "dir" else Path(value).exists()
            check(ok, f"{full}: {kind} '{value}' does not exist; fix the path or unset it")
        if dataclasses.is_dataclass(value):
            validate_tree(value, full)
    if hasattr(cfg, "validate"):
        cfg.validate(name)
