"""Reference pair computation: the literal math of DESIGN section 1, materialising everything.

keys, values [Bi, K, E] -> per-head logits [Bi, Bt, H, K] -> softmax over K -> mixed [Bi, Bt, E]
-> z = mixed @ W_o -> cos(z, t) -> s = exp(logit_scale) * cos + logit_bias [Bi, Bt].
Memory grows with Bi x Bt x E: it is the oracle for tests, for small sizes only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_scores(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                     logit_scale: Tensor, logit_bias: Tensor, *, num_heads: int, tau: float) -> Tensor:
    """Scores [Bi, Bt] of every image against every text. ``targets`` are unit-norm."""
    bi, k, e = keys.shape
    h, d = num_heads, e // num_heads
    kh = keys.reshape(bi, k, h, d)
    vh = values.reshape(bi, k, h, d)
    qh = queries.reshape(-1, h, d)
    attn = torch.softmax(torch.einsum("ikhd,jhd->ijhk", kh, qh) / tau, dim=-1)  # [Bi, Bt, H, K]
    mixed = torch.einsum("ijhk,ikhd->ijhd", attn, vh).reshape(bi, -1, e)  # [Bi, Bt, E]
    z = mixed @ w_o  # [Bi, Bt, E]
    cos = torch.einsum("ije,je->ij", F.normalize(z, dim=-1), targets)
    return logit_scale.exp() * cos + logit_bias


def sigmoid_loss_from_scores(scores: Tensor, offset: int, normalizer: float) -> Tensor:
    """SigLIP loss: -sum log sigmoid(y * s) / normalizer, y = +1 at column ``offset + row``."""
    bi = scores.shape[0]
    labels = -torch.ones_like(scores)
    rows = torch.arange(bi, device=scores.device)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * scores).sum() / normalizer


def reference_loss(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                   logit_scale: Tensor, logit_bias: Tensor, *, num_heads: int, tau: float,
                   offset: int, normalizer: float) -> Tensor:
    scores = reference_scores(keys, values, w_o, queries, targets, logit_scale, logit_bias,
                              num_heads=num_heads, tau=tau)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # the loss sum is accumulated in fp32 at least
    return sigmoid_loss_from_scores(scores, offset, normalizer)
