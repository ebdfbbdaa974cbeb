"""Image-text retrieval: Recall@1/5/10 in both directions, several captions per image.

images -> features once; captions -> features once; scores [N_images, N_captions] through the
pair head in blocks (never an N_images x N_captions x E tensor); then ranks:
image->text: an image is a hit at k if any of its captions is in its top k;
text->image: a caption is a hit at k if its image is in its top k.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def recall_at_k(scores: Tensor, caption_image: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``scores`` [N_img, N_cap]; ``caption_image[j]`` is the image index of caption j."""
    n_img, n_cap = scores.shape
    if caption_image.shape != (n_cap,):
        raise ValueError(f"caption_image must have one entry per caption ({n_cap}), got {tuple(caption_image.shape)}")
    owner = caption_image[None, :] == torch.arange(n_img)[:, None]  # [N_img, N_cap]
    if not owner.any(dim=1).all():
        raise ValueError("every image needs at least one caption for retrieval")
    # Rank of the best matching caption per image: captions scoring strictly higher than it.
    best_true = scores.masked_fill(~owner, float("-inf")).max(dim=1).values
    i2t_rank = (scores.masked_fill(owner, float("-inf")) > best_true[:, None]).sum(dim=1)
    true_scores = scores[caption_image, torch.arange(n_cap)]
    t2i_rank = (scores > true_scores[None, :]).sum(dim=0)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t_rank < k).float().mean().item()
        out[f"text_to_image_R@{k}"] = (t2i_rank < k).float().mean().item()
    return out
