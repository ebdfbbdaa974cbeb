"""Mixing weights of one image for several captions, and a picture of them.

image -> keys [K, E]; captions -> queries [n, E]; per head h: softmax_k(<key_hk, q_h> / tau)
-> weights [n, H, K]. The figure shows the image, then one row of heads x tokens heat maps per
caption with its score: different captions should pick different mixture tokens.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from llip_scale.data import eval_image
from llip_scale.eval.evalsets import load_retrieval_split


@torch.no_grad()
def caption_mixing(model, image: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """One image [3, S, S] and n tokenised captions [n, L] (on the model's device) -> the mixing
    weights [n, H, K] and the scores [n] of a Llip model."""
    keys, values = model.encode_image(image[None])
    queries, targets = model.encode_text(tokens)
    scores = model.score((keys, values), (queries, targets))[0]
    weights = mixing_weights(keys[0].float(), queries.float(), model.head.num_heads, model.head.tau)
    return weights.cpu(), scores.float().cpu()


def retrieval_figures(model, tokenize, folder: str | Path, image_size: int, device: torch.device, count: int,
                      render: bool = True) -> list:
    """Mixing figures of the first ``count`` images of a retrieval split, each with its own
    captions. Every caller runs the model (ZeRO-3 gathers parameters collectively); only those
    with ``render`` build figures."""

    split = load_retrieval_split(folder)
    figures = []
    for path, captions in list(zip(split.images, split.captions))[:count]:
        raw = Path(path).read_bytes()
        weights, scores = caption_mixing(model, eval_image(raw, image_size).to(device), tokenize(captions).to(device))
        if render:
            picture = np.asarray(Image.open(path).convert("RGB"))
            figures.append(plot_mixing(weights, captions, scores.tolist(), image=picture, title=Path(path).name))
    return figures


@torch.no_grad()
def mixing_weights(keys: Tensor, queries: Tensor, num_heads: int, tau: float) -> Tensor:
    """``keys`` [K, E] of one image, ``queries`` [n, E] -> weights [n, H, K] (rows sum to 1)."""
    k, e = keys.shape
    d = e // num_heads
    logits = torch.einsum("khd,nhd->nhk", keys.view(k, num_heads, d), queries.view(-1, num_heads, d))
    return torch.softmax(logits / tau, dim=-1)


def plot_mixing(weights: Tensor, captions: Sequence[str], scores: Sequence[float],
                image: Optional[np.ndarray] = None, title: str = ""):
    """A matplotlib Figure: the image and, per caption, its [H x K] mixing weights."""

    matplotlib.use("Agg")

    n, h, k = weights.shape
    cols = 2 if image is not None else 1
    # Room per caption row: its (wrapped) caption above the heat map, tick labels only at the bottom.
    fig, axes = plt.subplots(n, cols, figsize=(4 + 0.3 * k + (3 if image is not None else 0), 1.0 + (1.0 + 0.15 * h) * n),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 3] if cols == 2 else [1], "hspace": 0.9})
    for row in range(n):
        if image is not None:
            ax = axes[row, 0]
            ax.imshow(image) if row == 0 else None
            ax.axis("off")
        ax = axes[row, cols - 1]
        im = ax.imshow(weights[row].cpu().numpy(), vmin=0.0, vmax=float(weights.max()), cmap="viridis",
                       aspect="auto")
        caption = textwrap.fill(textwrap.shorten(f"{captions[row]}  (score {scores[row]:.2f})", width=130,
                                                 placeholder="..."), width=66)
        ax.set_title(caption, fontsize=8, loc="left")
        ax.set_yticks(range(h))
        ax.set_xticks(range(k) if row == n - 1 else [])
        ax.set_ylabel("head", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[-1, cols - 1].set_xlabel("mixture token", fontsize=7)
    fig.colorbar(im, ax=axes[:, cols - 1].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
