"""The trainer's own evaluation: loss and recall@1 on held-out image-text pairs.

Each rank encodes the same number of held-out pairs (its share of ``eval.heldout_samples``),
the features of all ranks are all-gathered, each rank scores its own images against every
held-out text with ``model.score`` (the training loss's logits), and the [N, N] score matrix is
all-gathered. From it: image->text and text->image recall@1, and the training loss computed
over consecutive blocks of the training global batch size (so the number is comparable with
the training loss). Every rank runs the same module calls, which ZeRO-3 needs.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llip_scale.config import Config
from llip_scale.distributed import DistEnv, all_gather_with_grad
from llip_scale.model import ContrastiveModel


def _blocks_loss(scores: Tensor, block: int, kind: str) -> float:
    """Mean over blocks of the per-image training loss of that block (sigmoid or InfoNCE)."""
    losses = []
    for start in range(0, scores.shape[0] - block + 1, block):
        s = scores[start:start + block, start:start + block].float()
        if kind == "clip":
            target = torch.arange(block)
            losses.append(0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.t(), target)))
        else:
            sign = 2 * torch.eye(block) - 1
            losses.append(F.softplus(-sign * s).sum() / block)
    return float(torch.stack(losses).mean()) if losses else float("nan")


def _recall_at_1(scores: Tensor) -> tuple[float, float]:
    truth = torch.arange(scores.shape[0])
    i2t = (scores.argmax(dim=1) == truth).float().mean()
    t2i = (scores.argmax(dim=0) == truth).float().mean()
    return float(i2t), float(t2i)


@torch.no_grad()
def evaluate_heldout(model: ContrastiveModel, batches: Any, cfg: Config, env: DistEnv) -> dict[str, float]:
    """Held-out metrics from ``batches`` (an iterator of this rank's held-out batches)."""
    per_rank = cfg.eval.heldout_samples // env.world_size
    images, texts, n = [], [], 0
    while n < per_rank:
        batch = next(batches)
        take = min(per_rank - n, batch.images.shape[0])
        pixels = batch.images[:take].to(env.device, next(model.parameters()).dtype)
        images.append(model.encode_image(pixels))
        texts.append(model.encode_text(batch.tokens[:take].to(env.device)))
        n += take
    img = tuple(torch.cat(parts) for parts in zip(*images))  # this rank's [N / world, ...]
    txt = tuple(all_gather_with_grad(torch.cat(parts)) for parts in zip(*texts))  # [N, ...]
    local = model.score(img, txt)  # [N / world, N]
    scores = all_gather_with_grad(local.float().contiguous()).cpu()  # [N, N]
    i2t, t2i = _recall_at_1(scores)
    block = min(cfg.batch_size, scores.shape[0])
    return {"eval/loss": _blocks_loss(scores, block, cfg.model.head.kind),
            "eval/image_to_text_r1": i2t, "eval/text_to_image_r1": t2i, "eval/pairs": float(scores.shape[0])}
