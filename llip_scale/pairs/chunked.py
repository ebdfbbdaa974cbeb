"""Chunked pair computation: blocks of texts, recomputed in backward. The CPU fast path.

Two exact reformulations avoid the per-pair ``E x E`` output projection:

* numerator: <mixed @ W_o, t_j> = <mixed, U_j> with U = t @ W_o^T, so
  <z_ij, t_j> = sum_{h,k} a_ijhk <v_ihk, U_jh>         (K*E per pair, no E-sized tensor);
* norm ("gram"): with folded values v'_ihk = v_ihk @ W_o[h*d:(h+1)*d] and per-image Gram
  G_i = V'_i V'_i^T [HK x HK],  ||z_ij||^2 = a_ij^T G_i a_ij       ((HK)^2 per pair),
  or ("plain") z_ij = mixed_ij @ W_o                                (E^2 per pair).

The cheaper of the two is chosen per shape (gram when H*K < E). Each text block runs under
activation checkpointing, so only the block's [Bi, chunk, H, K] tensors are alive at a time and
peak memory never grows with Bi x Bt x E.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Elements of one [Bi, chunk, H*K] (or [Bi, chunk, E]) block when chunk_size is not given.
BLOCK_ELEMENTS = 1 << 22


def choose_mode(num_tokens: int, num_heads: int, embed_dim: int) -> str:
    """'gram' costs (H*K)^2 per pair for the norm, 'plain' costs E^2: take the cheaper."""
    return "gram" if num_heads * num_tokens < embed_dim else "plain"


def default_chunk(bi: int, num_tokens: int, num_heads: int, embed_dim: int, bt: int) -> int:
    width = max(num_heads * num_tokens, embed_dim)
    return max(1, min(bt, BLOCK_ELEMENTS // max(1, bi * width)))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class _Prepared:
    """Per-image and per-text tensors shared by all blocks (built once, under autograd)."""

    def __init__(self, keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads: int, tau: float,
                 chunk_size: Optional[int], mode: Optional[str]):
        dt = _compute_dtype(keys)
        bi, k, e = keys.shape
        h, d = num_heads, e // num_heads
        self.mode = mode or choose_mode(k, num_heads, e)
        self.bt = queries.shape[0]
        self.chunk = chunk_size or default_chunk(bi, k, num_heads, e, self.bt)
        self.scale, self.bias = logit_scale.to(dt), logit_bias.to(dt)
        self.kh = keys.to(dt).reshape(bi, k, h, d)
        self.vh = values.to(dt).reshape(bi, k, h, d)
        self.qh = (queries.to(dt) / tau).reshape(-1, h, d)
        w = w_o.to(dt)
        self.t = targets.to(dt)
        if self.mode == "gram":
            self.u = (self.t @ w.t()).reshape(-1, h, d)  # U = t @ W_o^T  [Bt, H, d]
            folded = torch.einsum("ikhd,hde->ihke", self.vh, w.reshape(h, d, e)).reshape(bi, h * k, e)
            self.gram = folded @ folded.transpose(1, 2)  # [Bi, HK, HK]
        else:
            self.w = w


def _block_scores(kh, vh, aux, qh, u_or_t, scale, bias, mode: str) -> Tensor:
    """Scores [Bi, c] of all images against one block of c texts."""
    attn = torch.softmax(torch.einsum("ikhd,jhd->ijhk", kh, qh), dim=-1)  # [Bi, c, H, K]
    if mode == "gram":
        bi, c, h, k = attn.shape
        num = (attn * torch.einsum("ikhd,jhd->ijhk", vh, u_or_t)).sum((-1, -2))  # <z, t>
        flat = attn.reshape(bi, c, h * k)
        sq = (torch.bmm(flat, aux) * flat).sum(-1)  # ||z||^2 = a^T G a
        cos = num / sq.clamp_min(0).sqrt().clamp_min(1e-12)
    else:
        mixed = torch.einsum("ijhk,ikhd->ijhd", attn, vh).flatten(2)  # [Bi, c, E]
        z = mixed @ aux
        cos = torch.einsum("ije,je->ij", F.normalize(z, dim=-1), u_or_t)
    return scale.exp() * cos + bias


def _block_loss(kh, vh, aux, qh, u_or_t, scale, bias, mode: str, col0: int, offset: int) -> Tensor:
    s = _block_scores(kh, vh, aux, qh, u_or_t, scale, bias, mode)
    bi, c = s.shape
    # Positives from the index: column (col0 + j) matches row i when col0 + j == offset + i.
    rows = torch.arange(bi, device=s.device)[:, None]
    cols = torch.arange(col0, col0 + c, device=s.device)[None, :]
    sign = torch.where(cols == rows + offset, 1.0, -1.0).to(s.dtype)
    return F.softplus(-sign * s).sum()


def _blocks(prep: _Prepared):
    for start in range(0, prep.bt, prep.chunk):
        stop = min(prep.bt, start + prep.chunk)
        other = prep.u[start:stop] if prep.mode == "gram" else prep.t[start:stop]
        aux = prep.gram if prep.mode == "gram" else prep.w
        yield start, prep.qh[start:stop], other, aux


def chunked_loss(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                 logit_scale: Tensor, logit_bias: Tensor, *, num_heads: int, tau: float, offset: int,
                 normalizer: float, chunk_size: Optional[int] = None, mode: Optional[str] = None) -> Tensor:
    p = _Prepared(keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads, tau, chunk_size, mode)
    total = keys.new_zeros((), dtype=p.kh.dtype)
    for start, qh, other, aux in _blocks(p):
        args = (p.kh, p.vh, aux, qh, other, p.scale, p.bias, p.mode, start, offset)
        if torch.is_grad_enabled():
            total = total + checkpoint(_block_loss, *args, use_reentrant=False)
        else:
            total = total + _block_loss(*args)
    return total / normalizer


def chunked_scores(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                   logit_scale: Tensor, logit_bias: Tensor, *, num_heads: int, tau: float,
                   chunk_size: Optional[int] = None, mode: Optional[str] = None) -> Tensor:
    p = _Prepared(keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads, tau, chunk_size, mode)
    out = [_block_scores(p.kh, p.vh, aux, qh, other, p.scale, p.bias, p.mode)
           for _, qh, other, aux in _blocks(p)]
    return torch.cat(out, dim=1)
