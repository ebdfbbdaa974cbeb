"""llip_scale: pretraining Llip vision-language models at scale.

Inference, open_clip style::

    model, preprocess_train, preprocess_val = llip_scale.create_model_and_transforms("OUT_DIR")
    tokenizer = llip_scale.get_tokenizer("OUT_DIR")
    scores = model.score(images, tokenizer(["a photo of a cat"]))    # [n_images, n_texts]
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "load_pretrained": "llip_scale.interop.pretrained",
    "create_model": "llip_scale.interop.factory",
    "create_model_and_transforms": "llip_scale.interop.factory",
    "get_tokenizer": "llip_scale.interop.factory",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so that `import llip_scale` (config handling, the CLI) does not pull in torch.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llip_scale' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
