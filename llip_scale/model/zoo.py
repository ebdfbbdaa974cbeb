"""Named model sizes, stored as YAML in ``configs/models/NAME.yaml``."""
from __future__ import annotations

from llip_scale.config_files import CONFIG_ROOT, apply_overrides, load_yaml
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
