"""Batched encoding for evaluation: images once into their features, texts once into theirs.

Features are tuples of tensors (Llip: keys and values per image, queries and targets per text;
baselines: one unit vector), concatenated over batches on the CPU so that scoring can walk them
in blocks without re-encoding.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

Features = tuple[Tensor, ...]


def _cat(parts: list[Features]) -> Features:
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))


@torch.no_grad()
def encode_images(model, images: Iterable[Tensor], device: torch.device) -> Features:
    """Encode an iterable of image batches [b, 3, S, S]."""
    parts = [tuple(f.float().cpu() for f in model.encode_image(batch.to(device))) for batch in images]
    if not parts:
        raise ValueError("no images to evaluate")
    return _cat(parts)


@torch.no_grad()
def encode_texts(model, tokens: Tensor, device: torch.device, batch_size: int = 256) -> Features:
    """Encode tokenised texts [N, L] in batches."""
    parts = [tuple(f.float().cpu() for f in model.encode_text(tokens[i:i + batch_size].to(device)))
             for i in range(0, tokens.shape[0], batch_size)]
    return _cat(parts)


@torch.no_grad()
def score_all(model, image_features: Features, text_features: Features, device: torch.device,
              block: int = 256, tau: Optional[float] = None) -> Tensor:
    """Scores [N_images, N_texts], walking the images in blocks (the pair head blocks the texts)."""
    n = image_features[0].shape[0]
    text = tuple(f.to(device) for f in text_features)
    rows = []
    for i in range(0, n, block):
        img = tuple(f[i:i + block].to(device) for f in image_features)
        rows.append(model.score(img, text, tau=tau).float().cpu())
    return torch.cat(rows)


def batched(items: list, size: int, fn: Callable) -> Iterable:
    """Apply ``fn`` to consecutive slices of ``items`` (e.g. load + transform images)."""
    for i in range(0, len(items), size):
        yield fn(items[i:i + size])
