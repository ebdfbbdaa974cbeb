"""Named model sizes, stored as YAML in ``configs/models/NAME.yaml``."""
from __future__ import annotations

from pathlib import Path

from llip_scale.model.config import ModelConfig



def _models_dir() -> Path:
    import llip_scale.configs as packaged

    return Path(packaged.__file__).resolve().parent / "models"


MODELS_DIR = _models_dir()


def model_names() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def model_config(name: str, **head_overrides) -> ModelConfig:
    """The ModelConfig of a named size (``tiny``, ``b32``, ``b16``, ``l14``, ``h14``, ``g14``)."""
    from llip_scale.config import ConfigError, apply_overrides, from_dict, load_yaml, _validate_tree

    path = MODELS_DIR / f"{name.lower().replace('/', '')}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model size '{name}'; choose one of {', '.join(model_names())}")
    data = load_yaml(path).get("model", {})
    data = apply_overrides(data, [f"head.{k}={v}" for k, v in head_overrides.items()])
    cfg = from_dict(ModelConfig, data, "model")
    _validate_tree(cfg, "model")
    return cfg
