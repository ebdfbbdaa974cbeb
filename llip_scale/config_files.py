"""Config files: YAML with ``base:`` includes, dotted overrides, and the packaged ``configs/``.

Flow: a path or a packaged name -> the file and its ``base:`` files, merged -> ``a.b=value``
overrides applied -> a plain dict, which :mod:`llip_scale.config` (the run) or
:mod:`llip_scale.model.zoo` (a model size) turns into dataclasses.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

import llip_scale.configs as packaged  # the repo's configs/ folder, installed into the package
from llip_scale.errors import ConfigError

CONFIG_ROOT = Path(packaged.__file__).resolve().parent


class _Loader(yaml.SafeLoader):
    """YAML 1.2-style scalars: no base-60 numbers (``4:00:00`` stays a string), ``1e-3`` is a float."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if not (tag.endswith((":int", ":float")) and rx.match("1:00"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def deep_merge(base: dict, update: dict) -> dict:
    """Recursively merge ``update`` into a copy of ``base`` (update wins)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config file by path, or by name inside the packaged ``configs/`` folder."""
    p = Path(path)
    candidates = [p, CONFIG_ROOT / p, CONFIG_ROOT / f"{p}.yaml",
                  CONFIG_ROOT / "experiments" / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    if p.is_dir():
        raise ConfigError(f"config path '{path}' is a folder; pass a YAML file, e.g. "
                          f"{p / 'config.yaml'} in a run folder")
    raise ConfigError(f"config file '{path}' not found; pass a YAML path or a name under {CONFIG_ROOT}")


def load_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML config, merging the files named by its ``base:`` key first."""
    p = resolve_config_path(path)
    if p in _seen:
        raise ConfigError(f"config include cycle: {' -> '.join(map(str, _seen + (p,)))}")
    try:
        data = parse_yaml(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save the file as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror}); check the file and its permissions") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of config keys")
    bases = data.pop("base", []) or []
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        bp = (p.parent / b) if (p.parent / b).is_file() else b
        merged = deep_merge(merged, load_yaml(bp, _seen + (p,)))
    return deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``1e-3``, ``true``, ``[1,2]``)."""
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value, e.g. model.vision.width=64")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return out
