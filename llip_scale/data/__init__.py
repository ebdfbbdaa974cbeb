"""Data: webdataset shards, the resumable stream, transforms, tokenizer.

The public names are imported lazily, so ``llip_scale.config`` (which needs only
``llip_scale.data.config``) and the shard tools do not pull in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "llip_scale.data.config",
    "build_train_loader": "llip_scale.data.loader",
    "TrainLoader": "llip_scale.data.loader",
    "Batch": "llip_scale.data.loader",
    "reshard_state": "llip_scale.data.loader",
    "keys_digest": "llip_scale.data.loader",
    "Tokenizer": "llip_scale.data.tokenizer",
    "train_tokenizer": "llip_scale.data.tokenizer",
    "check_sources": "llip_scale.data.shards",
    "parse_sources": "llip_scale.data.shards",
    "DataError": "llip_scale.data.stream",
    "eval_image": "llip_scale.data.transforms",
    "OPENAI_MEAN": "llip_scale.data.transforms",
    "OPENAI_STD": "llip_scale.data.transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llip_scale.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
