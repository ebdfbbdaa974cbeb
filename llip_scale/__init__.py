"""llip_scale: pretraining Llip vision-language models at scale."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_pretrained"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import llip_scale` (config handling, the CLI) does not pull in torch.
    if name == "load_pretrained":
        from llip_scale.pretrained import load_pretrained
        return load_pretrained
    raise AttributeError(f"module 'llip_scale' has no attribute '{name}'")
