"""The trainer's own evaluation: loss and recall@1 on held-out image-text pairs.

Pairs come from one of: the synthetic source's held-out stream (``data.source: synthetic``),
held-out shards (``eval.heldout_shards``), or the first caption of each image of a retrieval
folder (``eval.retrieval_dir``). Each rank encodes the same number of pairs (its share of
``eval.heldout_samples``), the text features of all ranks are all-gathered, each rank scores
its own images against every held-out text with ``model.score`` (the training loss's logits),
and the [N, N] score matrix is all-gathered. From it: image->text and text->image recall@1, and
the training loss computed over consecutive blocks of the training global batch size (so the
number is comparable with the training loss). Every rank makes the same module calls, which
ZeRO-3 needs.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from llip_scale.config import Config
from llip_scale.dist.collectives import DistEnv, all_gather_with_grad
from llip_scale.eval.evalsets import EvalImages, load_retrieval_split
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


def folder_pairs(folder: str, tokenizer: Any, image_size: int, samples: int, batch_size: int,
                 env: DistEnv) -> tuple[int, Iterator[Any]]:
    """(pairs per rank, batches of this rank) from a retrieval folder: each image with its first
    caption; the first ``samples`` images (fewer if the folder has fewer), split over ranks."""

    split = load_retrieval_split(folder)
    per_rank = min(samples, len(split.images)) // env.world_size
    mine = range(env.rank * per_rank, (env.rank + 1) * per_rank)
    images = EvalImages([split.images[i] for i in mine], image_size)

    def batches() -> Iterator[Any]:
        for start in range(0, per_rank, batch_size):
            rows = range(start, min(start + batch_size, per_rank))
            yield SimpleNamespace(images=torch.stack([images[i] for i in rows]),
                                  tokens=tokenizer([split.captions[mine[i]][0] for i in rows]))

    return per_rank, batches()


@torch.no_grad()
def evaluate_heldout(model: ContrastiveModel, batches: Iterator[Any], cfg: Config, env: DistEnv,
                     per_rank: Optional[int] = None) -> dict[str, float]:
    """Held-out metrics from ``batches`` (this rank's held-out batches), ``per_rank`` pairs each."""
    per_rank = per_rank if per_rank is not None else cfg.eval.heldout_samples // env.world_size
    dtype = next(model.parameters()).dtype
    images, texts, n = [], [], 0
    while n < per_rank:
        batch = next(batches)
        take = min(per_rank - n, batch.images.shape[0])
        images.append(model.encode_image(batch.images[:take].to(env.device, dtype)))
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


def heldout_source(cfg: Config) -> str:
    """Where the held-out pairs come from: synthetic, shards, folder, or none."""
    if cfg.eval.heldout_samples == 0:
        return "none"
    if cfg.data.source == "synthetic":
        return "synthetic"
    return "shards" if cfg.eval.heldout_shards else "folder" if cfg.eval.retrieval_dir else "none"
