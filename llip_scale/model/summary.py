"""Parameter counts per part, computed on the meta device (no weights are allocated)."""
from __future__ import annotations

import torch
from torch import nn

from llip_scale.model.config import ModelConfig
from llip_scale.model.llip import build_model


def _count(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """{'vision', 'text', 'head', 'total'}; text includes the text projection (W_text)."""
    with torch.device("meta"):
        model = build_model(cfg)
    vision = _count(model.visual)
    text = _count(model.text, model.text_projection)
    head = _count(getattr(model, "image_proj", None), getattr(model, "q_proj", None),
                  getattr(model, "q_norm", None), model.head)
    total = _count(model)
    assert vision + text + head == total, "every parameter belongs to exactly one part"
    return {"vision": vision, "text": text, "head": head, "total": total}
