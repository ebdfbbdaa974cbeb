"""Load an exported model for inference: ``model.safetensors`` + ``config.yaml`` -> ContrastiveModel.

``tools/export_checkpoint.py`` writes the pair from a training checkpoint (any ZeRO stage).
The loaded model is in eval mode and exposes ``encode_image``, ``encode_text`` and ``score``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from llip_scale.errors import ConfigError, from_dict, validate_tree
from llip_scale.model import ContrastiveModel, ModelConfig, build_model


def _files(path: Path) -> tuple[Path, Path]:
    weights = path / "model.safetensors" if path.is_dir() else path
    config = weights.parent / "config.yaml"
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist; pass the folder written by tools/export_checkpoint.py")
    return weights, config


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write ``state`` as safetensors with the usual permissions: safetensors creates the file
    readable by its owner only (0600); give it what the umask allows, as ``open()`` would."""

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu",
                    backend: str = "auto") -> ContrastiveModel:
    """The exported model at ``path`` (its folder or its ``.safetensors`` file), in eval mode."""

    weights, config = _files(Path(path))
    data = yaml.safe_load(config.read_text()) or {}
    if "model" not in data:
        raise ConfigError(f"{config} has no 'model' section; re-export the checkpoint")
    model_cfg = from_dict(ModelConfig, data["model"], "model")
    validate_tree(model_cfg, "model")
    model = build_model(model_cfg, backend=backend)
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return model.to(device).eval()
