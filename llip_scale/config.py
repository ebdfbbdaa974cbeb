"""Config tree: dataclasses, YAML loading, dotted CLI overrides, validation.

Flow: YAML file (with optional ``base:`` includes) -> nested dict -> dotted overrides applied
-> dataclass tree built with type checks (unknown keys name the closest valid key) ->
``validate()`` of every node -> the resolved tree is written back as YAML into the run folder.
Every error is a :class:`ConfigError` with one line naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from llip_scale.data.config import DataConfig
from llip_scale.launchers.config import LauncherConfig
from llip_scale.model.config import ModelConfig
from llip_scale.pairs.config import LossConfig



def _configs_root() -> Path:
    import llip_scale.configs as packaged  # the repo's configs/ folder, installed into the package

    return Path(packaged.__file__).resolve().parent


CONFIG_ROOT = _configs_root()


class ConfigError(ValueError):
    """A configuration problem, reported before any compute happens."""


def path_field(default: str = "", kind: str = "file") -> Any:
    """A string field naming a file or folder that must exist when it is set."""
    return field(default=default, metadata={"path": kind})


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.2
    warmup_steps: int = 2000
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping
    max_nonfinite_steps: int = 10  # consecutive non-finite losses before the run stops

    def validate(self, name: str) -> None:
        check(self.lr > 0, f"{name}.lr must be > 0, got {self.lr}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
              f"{name}.betas must be two numbers in [0, 1), got {self.betas}")
        check(self.warmup_steps >= 0, f"{name}.warmup_steps must be >= 0")
        check(self.grad_clip >= 0, f"{name}.grad_clip must be >= 0 (0 disables it)")
        check(self.max_nonfinite_steps >= 1, f"{name}.max_nonfinite_steps must be >= 1")
        check(0 <= self.min_lr_ratio <= 1, f"{name}.min_lr_ratio must be in [0, 1]")


@dataclass
class DistributedConfig:
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    offload_optimizer: bool = False
    offload_params: bool = False
    # Signals that ask the run to checkpoint at the next step boundary and exit (to be requeued):
    # Slurm's --signal (USR1/USR2; the launchers use USR2) and the TERM sent on preemption.
    preempt_signals: list = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM"])
    # Deep-merged last into the generated DeepSpeed config, e.g.
    # {zero_optimization: {stage3_prefetch_bucket_size: 5e8, stage3_max_live_parameters: 1e9}}.
    deepspeed: dict = field(default_factory=dict)

    def validate(self, name: str) -> None:
        check(self.zero_stage in (0, 1, 2, 3), f"{name}.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(not self.offload_params or self.zero_stage == 3,
              f"{name}.offload_params needs {name}.zero_stage=3")
        check(not self.offload_optimizer or self.zero_stage >= 1,
              f"{name}.offload_optimizer needs {name}.zero_stage >= 1")
        import signal
        for sig in self.preempt_signals:
            check(isinstance(sig, str) and hasattr(signal, sig.upper()),
                  f"{name}.preempt_signals: '{sig}' is not a signal name; use e.g. SIGUSR1 or SIGTERM")
        zero = self.deepspeed.get("zero_optimization")
        if isinstance(zero, dict) and "stage" in zero:
            check(zero["stage"] == self.zero_stage,
                  f"{name}.deepspeed sets zero_optimization.stage={zero['stage']}; set {name}.zero_stage instead")


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; 0 disables periodic checkpoints
    keep_last: int = 3
    resume: bool = True

    def validate(self, name: str) -> None:
        check(self.every >= 0, f"{name}.every must be >= 0 (0 disables periodic checkpoints)")
        check(self.keep_last >= 1, f"{name}.keep_last must be >= 1")


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0 evaluates only at the end
    zeroshot_dir: str = path_field(kind="dir")
    retrieval_dir: str = path_field(kind="dir")
    batch_size: int = 64
    # Held-out pairs scored by the trainer itself (loss and recall@1): the synthetic source has
    # its own held-out stream; for webdataset data, these shards, else the first caption of each
    # image of retrieval_dir; neither: no held-out loss.
    heldout_shards: str = ""
    heldout_samples: int = 512  # pairs, over all ranks; 0 disables the held-out evaluation
    # Llip: at each evaluation, TensorBoard gets a picture of the mixing weights of this many
    # retrieval_dir images, each with its own captions (eval/mixing/N); 0 disables it.
    mixing_images: int = 1

    def validate(self, name: str) -> None:
        check(self.every >= 0, f"{name}.every must be >= 0")
        check(self.batch_size >= 1, f"{name}.batch_size must be >= 1")
        check(self.heldout_samples >= 0, f"{name}.heldout_samples must be >= 0 (0 disables it)")
        check(self.mixing_images >= 0, f"{name}.mixing_images must be >= 0 (0 disables it)")


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    progress: Literal["auto", "bar", "lines", "none"] = "auto"  # auto: a bar on a TTY, else lines
    # Peak dense FLOP/s of one device, in TFLOP/s, the denominator of the reported MFU. The
    # default is a rough figure for a few CPU cores; use e.g. 989 for an H100/H200 in bf16.
    peak_tflops: float = 0.1

    def validate(self, name: str) -> None:
        check(self.every >= 1, f"{name}.every must be >= 1")
        check(self.peak_tflops > 0, f"{name}.peak_tflops must be > 0")


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 256  # global, over all ranks
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    def validate(self, name: str) -> None:
        check(self.steps >= 1, "steps must be >= 1")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        run_dir = Path(self.run_dir)
        blocker = next((a for a in (run_dir, *run_dir.parents) if a.exists()), None)
        check(blocker is None or blocker.is_dir(),
              f"run_dir={self.run_dir}: '{blocker}' is an existing file, not a folder; choose another run_dir")


def local_batch_size(cfg: Config, world_size: int) -> int:
    """The per-rank batch; a ConfigError when the global batch does not split evenly."""
    check(cfg.batch_size % world_size == 0,
          f"batch_size={cfg.batch_size} is not divisible by the {world_size} ranks; "
          f"set batch_size to a multiple of {world_size}")
    return cfg.batch_size // world_size


def check(ok: bool, message: str) -> None:
    """Raise a ConfigError with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# YAML files, includes and overrides
# ---------------------------------------------------------------------------------------------

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


def _validate_tree(cfg: Any, name: str) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        full = f"{name}.{f.name}" if name else f.name
        kind = f.metadata.get("path")
        if kind and value:
            ok = Path(value).is_dir() if kind == "dir" else Path(value).exists()
            check(ok, f"{full}: {kind} '{value}' does not exist; fix the path or unset it")
        if dataclasses.is_dataclass(value):
            _validate_tree(value, full)
    if hasattr(cfg, "validate"):
        cfg.validate(name)


def validate(cfg: Config) -> Config:
    """Run every node's checks and the cross-section checks; return ``cfg``."""
    _validate_tree(cfg, "")
    check(cfg.data.context_length in (None, cfg.model.text.context_length),
          f"model.text.context_length={cfg.model.text.context_length} differs from "
          f"data.context_length={cfg.data.context_length}; set both to the same value")
    return cfg


def build_config(data: dict) -> Config:
    """Dataclass tree from a plain dict, validated."""
    return validate(from_dict(Config, data))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate.
    When the overrides fail, each is tried on its own so that all wrong ones are reported."""
    data = load_yaml(path) if path else {}
    overrides = overrides or []
    try:
        return build_config(apply_overrides(data, overrides))
    except ConfigError as error:
        wrong = _override_errors(data, overrides) if len(overrides) > 1 else []
        if len(wrong) > 1:
            raise ConfigError(f"{len(wrong)} problems: " + "; ".join(wrong)) from None
        raise error from None


def _override_errors(data: dict, overrides: list[str]) -> list[str]:
    """The distinct errors of the overrides that fail on their own, in order."""
    out = []
    for item in overrides:
        try:
            build_config(apply_overrides(data, [item]))
        except ConfigError as e:
            if str(e) not in out:
                out.append(str(e))
    return out


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (reloadable with :func:`load_config`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
