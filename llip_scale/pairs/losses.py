"""Losses of the one-vector baselines (SigLIP, CLIP), in the same local-x-gathered layout."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _positives(bi: int, bt: int, offset: int, device: torch.device) -> Tensor:
    if offset < 0 or offset + bi > bt:
        raise ValueError(f"positives at columns [{offset}, {offset + bi}) fall outside the {bt} columns")
    return torch.arange(bi, device=device) + offset


def sigmoid_loss(images: Tensor, texts: Tensor, logit_scale: Tensor, logit_bias: Tensor, *,
                 offset: int = 0, normalizer: Optional[float] = None) -> Tensor:
    """SigLIP loss of local images [Bi, E] x all texts [Bt, E] (both unit-norm)."""
    scores = logit_scale.exp() * images @ texts.t() + logit_bias  # [Bi, Bt]
    bi, bt = scores.shape
    pos = _positives(bi, bt, offset, scores.device)
    sign = torch.where(torch.arange(bt, device=scores.device)[None] == pos[:, None], 1.0, -1.0)
    return F.softplus(-sign * _at_least_fp32(scores)).sum() / (normalizer or bi)


def clip_loss(images: Tensor, texts: Tensor, all_images: Tensor, all_texts: Tensor, logit_scale: Tensor, *,
              offset: int = 0) -> Tensor:
    """InfoNCE of local images vs all texts and local texts vs all images (unit-norm inputs).

    Each rank covers its own image rows and text columns, normalised by its local batch, so the
    mean over ranks (what data-parallel gradient averaging computes) is the single-process loss.
    """
    scale = logit_scale.exp()
    bi = images.shape[0]
    pos = _positives(bi, all_texts.shape[0], offset, images.device)
    i2t = F.cross_entropy(_at_least_fp32(scale * images @ all_texts.t()), pos, reduction="sum")
    t2i = F.cross_entropy(_at_least_fp32(scale * texts @ all_images.t()), pos, reduction="sum")
    return (i2t + t2i) / (2 * bi)
