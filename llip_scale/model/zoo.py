"""Named model sizes, stored as YAML in ``configs/models/NAME.yaml``."""
from __future__ import annotations

from pathlib import Path

from llip_scale.config_files import CONFIG_ROOT, apply_overrides, load_yaml, resolve_config_path
from llip_scale.errors import ConfigError, from_dict, validate_tree
from llip_scale.model.config import ModelConfig

MODELS_DIR = CONFIG_ROOT / "models"


def model_names() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def model_config(name: str, **head_overrides) -> ModelConfig:
    """The ModelConfig of a named size (``tiny``, ``b32``, ``b16``, ``l14``, ``h14``, ``g14``)."""
    path = MODELS_DIR / f"{name.lower().replace('/', '')}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model size '{name}'; choose one of {', '.join(model_names())}")
    data = load_yaml(path).get("model", {})
    data = apply_overrides(data, [f"head.{k}={v}" for k, v in head_overrides.items()])
    cfg = from_dict(ModelConfig, data, "model")
    validate_tree(cfg, "model")
    return cfg


def size_or_config(arg: str) -> tuple[str | None, Path | None]:
    """What a tool's MODEL argument names: a size (``b16``, ``ViT-B/16`` style ``B/16`` too) gives
    ``(name, None)``; a config file, by path or by name under the packaged ``configs/``
    (``official/llip_l14_k32``), gives ``(None, path)``. Anything else is a one-line ConfigError."""
    key = arg.lower().replace("/", "")
    if (MODELS_DIR / f"{key}.yaml").is_file():
        return key, None
    try:
        return None, resolve_config_path(arg)
    except ConfigError:
        raise ConfigError(f"'{arg}' is neither a model size ({', '.join(model_names())}) nor a config "
                          "file") from None


def recipe_path(name: str) -> Path:
    """The training config of a named size: its Llip experiment config
    (``configs/experiments/llip_NAME.yaml``), or the size alone where there is none (``tiny``)."""
    key = name.lower().replace("/", "")
    recipe = MODELS_DIR.parent / "experiments" / f"llip_{key}.yaml"
    return recipe if recipe.is_file() else MODELS_DIR / f"{key}.yaml"
