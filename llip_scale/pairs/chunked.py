"""Chunked pair computation: blocks of images x texts, never a B_i x B_t x K tensor. The CPU path.

Two exact reformulations avoid the per-pair ``E x E`` output projection:

* numerator: <mixed @ W_o, t_j> = <mixed, U_j> with U = t @ W_o^T, so
  <z_ij, t_j> = sum_{h,k} a_ijhk <v_ihk, U_jh>         (K*E per pair, no E-sized tensor);
* norm ("gram"): with folded values v'_ihk = v_ihk @ W_o[h*d:(h+1)*d] and per-image Gram
  G_i = V'_i V'_i^T [HK x HK],  ||z_ij||^2 = a_ij^T G_i a_ij       ((HK)^2 per pair),
  or ("plain") z_ij = mixed_ij @ W_o                                (E^2 per pair).

The cheaper of the two is chosen per shape (gram when H*K < E, every model in the zoo).

Gram mode is one fused pass (``_FusedGram``): per block of images x texts, the logits and the
``<v, U>`` terms of all heads come from one batched matmul, the scores and the sigmoid loss
follow, and -- when gradients are wanted -- the gradients of the block are computed right
there from the loss's closed-form derivative and accumulated into the per-text and per-image
gradients (queries and U, keys and values, G). Nothing is recomputed in backward, which only
scales the accumulated gradients by the incoming one; the block order is fixed, so gradients
are bitwise repeatable. Plain mode runs each text block under activation checkpointing.
Either way only one block's tensors are alive at a time, so peak memory never grows with
Bi x Bt x E.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Elements of one block: [images, texts, H*K] in gram mode; [Bi, chunk, E] in plain mode when
# chunk_size is not given.
BLOCK_ELEMENTS = 1 << 22
# Gram mode: texts per block (the inner size of the dG product, the rows of the G product),
# unless chunk_size says otherwise; images per block fill BLOCK_ELEMENTS.
GRAM_TEXTS = 256
WORKSPACE_BLOCKS = 7  # buffers of one block's [images, texts, H*K] size that the fused pass holds


def choose_mode(num_tokens: int, num_heads: int, embed_dim: int) -> str:
    """'gram' costs (H*K)^2 per pair for the norm, 'plain' costs E^2: take the cheaper."""
    return "gram" if num_heads * num_tokens < embed_dim else "plain"


def default_chunk(bi: int, num_tokens: int, num_heads: int, embed_dim: int, bt: int) -> int:
    width = max(num_heads * num_tokens, embed_dim)
    return max(1, min(bt, BLOCK_ELEMENTS // max(1, bi * width)))


def gram_blocks(bi: int, bt: int, num_tokens: int, num_heads: int, chunk_size: Optional[int] = None) -> tuple[int, int]:
    """(images, texts) per block of the fused gram pass: one block holds ~BLOCK_ELEMENTS pair x token entries."""
    texts = min(bt, chunk_size or GRAM_TEXTS)
    images = max(1, min(bi, BLOCK_ELEMENTS // (texts * num_heads * num_tokens)))
    return images, texts


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


# -- gram mode: one fused pass, gradients computed with the loss ------------------------------

class _GramInputs(NamedTuple):
    qu: Tensor  # [2H, Bt, d]: queries / tau, then U = t @ W_o^T, head by head
    kv: Tensor  # [2H, d, Bi*K]: keys, then values, head by head, transposed (columns image-major)
    gram: Tensor  # [Bi, H*K, H*K]: G_i of the values folded with W_o, index h*K + k
    num_heads: int
    num_tokens: int


def _gram_inputs(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                 num_heads: int, tau: float) -> _GramInputs:
    """Per-text and per-image operands of the fused pass, built under autograd (their
    gradients flow back to the inputs through these few ops)."""
    dt = _compute_dtype(keys)
    bi, k, e = keys.shape
    h, d = num_heads, e // num_heads
    w = w_o.to(dt)
    u = targets.to(dt) @ w.t()  # U = t @ W_o^T  [Bt, E]
    qu = torch.stack([queries.to(dt) / tau, u]).reshape(2, -1, h, d).permute(0, 2, 1, 3).reshape(2 * h, -1, d)
    kv = torch.stack([keys.to(dt), values.to(dt)]).reshape(2, bi, k, h, d).permute(0, 3, 4, 1, 2)
    folded = torch.einsum("ikhd,hde->ihke", values.to(dt).reshape(bi, k, h, d), w.reshape(h, d, e))
    folded = folded.reshape(bi, h * k, e)
    return _GramInputs(qu, kv.reshape(2 * h, d, bi * k), folded @ folded.transpose(1, 2), h, k)


class _Workspace:
    """Buffers of one block, allocated once per pass and reused by every block (allocating
    them per block costs page faults at these sizes)."""

    def __init__(self, blocks: tuple[int, int], h: int, k: int, like: Tensor, grads: bool):
        n = blocks[0] * blocks[1] * h * k  # WORKSPACE_BLOCKS of n in all
        self.raw = like.new_empty(2 * n)  # head-major matmul output, then its gradient
        self.both = like.new_empty(2 * n)  # image-major logits and <v, U>
        self.attn = like.new_empty(n)
        self.ga = like.new_empty(n)  # G a, then a * dloss/d||z||^2
        self.dattn = like.new_empty(n if grads else 0)


class _Block(NamedTuple):
    attn: Tensor  # [bI, c, H*K] attention weights a
    nv: Tensor  # [bI, c, H*K] <v_ihk, U_jh>
    ga: Tensor  # [bI, c, H*K] G_i a_ij
    norm: Tensor  # [bI, c] ||z_ij||
    cos: Tensor  # [bI, c] cos(z_ij, t_j)


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """sum(x * y, -1) for [..., n] tensors as one batched matrix-vector product (no temporary)."""
    return (x.unsqueeze(-2) @ y.unsqueeze(-1)).flatten(-3)


def _block_forward(qu: Tensor, kv: Tensor, gram: Tensor, h: int, k: int, ws: _Workspace) -> _Block:
    """One block: qu [2H, c, d] of c texts, kv [2H, d, bI*K] and gram [bI, HK, HK] of bI images."""
    c, bi = qu.shape[1], gram.shape[0]
    n = bi * c * h * k
    # Logits and <v, U> of all heads in one batched matmul, head-major; the G product and the
    # reductions over (h, k) want them image-major: one copy to [2, bI, c, H, K].
    raw = torch.bmm(qu, kv, out=ws.raw[:2 * n].view(2 * h, c, bi * k))
    both = ws.both[:2 * n].view(2, bi, c, h, k)
    both.copy_(raw.view(2, h, c, bi, k).permute(0, 3, 2, 1, 4))
    attn = torch.softmax(both[0], dim=-1, out=ws.attn[:n].view(bi, c, h, k)).view(bi, c, h * k)
    nv = both[1].view(bi, c, h * k)
    ga = torch.bmm(attn, gram, out=ws.ga[:n].view(bi, c, h * k))
    norm = _rowdot(attn, ga).clamp_min_(0).sqrt_().clamp_min_(1e-12)
    return _Block(attn, nv, ga, norm, _rowdot(attn, nv).div_(norm))


class _Grads(NamedTuple):
    """Gradients of the summed loss, accumulated block by block."""
    qu: Tensor
    kv: Tensor
    gram: Tensor
    scale: Tensor
    bias: Tensor


def _block_backward(blk: _Block, qu: Tensor, kv: Tensor, dscores: Tensor, scale_exp: Tensor, h: int, k: int,
                    grads: _Grads, texts: slice, dkv: Tensor, dgram: Tensor, ws: _Workspace) -> None:
    """Add the block's gradients, given dloss/dscores [bI, c], to ``grads`` (texts, scale, bias)
    and to its images' ``dkv`` [2H, d, bI*K] (keys and values) and ``dgram`` [bI, HK, HK]."""
    bi, c, hk = blk.attn.shape
    n = bi * c * hk
    grads.scale.add_((dscores * blk.cos).sum() * scale_exp)
    grads.bias.add_(dscores.sum())
    dcos = dscores * scale_exp
    dnum = dcos / blk.norm
    # ||z|| = sqrt(a^T G a) (clamped at 1e-12: no gradient there)
    dsq = torch.where(blk.norm > 1e-12, -0.5 * dcos * blk.cos / blk.norm.square(), 0.0)
    dattn = torch.mul(blk.nv, dnum[..., None], out=ws.dattn[:n].view(bi, c, hk))
    dattn.addcmul_(blk.ga, (2 * dsq)[..., None])
    # Softmax backward, per head: d logits = a * (d a - <a, d a>_k).
    attn, dattn4 = blk.attn.view(bi, c, h, k), dattn.view(bi, c, h, k)
    dattn4.sub_(_rowdot(attn, dattn4)[..., None])
    # d logits and d <v, U>, written head-major for the gradient matmuls.
    dboth = ws.raw[:2 * n].view(2, h, c, bi, k)
    dview = dboth.permute(0, 3, 2, 1, 4)  # [2, bI, c, H, K]
    torch.mul(attn, dattn4, out=dview[0])
    torch.mul(attn, dnum[..., None, None], out=dview[1])
    dboth = dboth.view(2 * h, c, bi * k)
    grads.qu[:, texts] += torch.bmm(dboth, kv.transpose(1, 2))  # a strided view: baddbmm_ on it would loop
    dkv.baddbmm_(qu.transpose(1, 2), dboth)
    weighted = torch.mul(blk.attn, dsq[..., None], out=blk.ga)  # G a is used up
    dgram.baddbmm_(weighted.transpose(1, 2), blk.attn)


def _gram_pass(inp: _GramInputs, logit_scale: Tensor, logit_bias: Tensor, blocks: tuple[int, int],
               offset: Optional[int], grads: Optional[_Grads]) -> Tensor:
    """All blocks: the summed loss (``offset`` given) or the scores [Bi, Bt] (``offset`` None)."""
    h, k = inp.num_heads, inp.num_tokens
    bi, bt = inp.gram.shape[0], inp.qu.shape[1]
    ws = _Workspace(blocks, h, k, inp.qu, grads is not None)
    scale_exp = logit_scale.exp()
    total = inp.qu.new_zeros(()) if offset is not None else inp.qu.new_empty(bi, bt)
    for i0 in range(0, bi, blocks[0]):
        rows = slice(i0, min(bi, i0 + blocks[0]))
        cols = slice(i0 * k, rows.stop * k)
        # The block's images contiguous: in-place batched matmuls on column slices would loop.
        kv = inp.kv[:, :, cols].contiguous()
        dkv = torch.zeros_like(kv) if grads is not None else None
        for j0 in range(0, bt, blocks[1]):
            texts = slice(j0, min(bt, j0 + blocks[1]))
            qu = inp.qu[:, texts]
            blk = _block_forward(qu, kv, inp.gram[rows], h, k, ws)
            scores = scale_exp * blk.cos + logit_bias
            if offset is None:
                total[rows, texts] = scores
                continue
            # The positive of image row r is text column offset + r.
            dev = scores.device
            pos = torch.arange(rows.start, rows.stop, device=dev)[:, None] + offset == \
                torch.arange(texts.start, texts.stop, device=dev)
            sign = torch.where(pos, 1.0, -1.0).to(scores.dtype)
            total += F.softplus(-sign * scores).sum()
            if grads is not None:
                _block_backward(blk, qu, kv, -sign * torch.sigmoid(-sign * scores), scale_exp, h, k, grads,
                                texts, dkv, grads.gram[rows], ws)
        if grads is not None:
            grads.kv[:, :, cols] = dkv
    return total


class _FusedGram(torch.autograd.Function):
    """The gram-mode loss; its forward also accumulates the gradients, its backward scales them."""

    @staticmethod
    def forward(ctx, qu: Tensor, kv: Tensor, gram: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                shape: tuple[int, int], offset: int, normalizer: float, blocks: tuple[int, int]) -> Tensor:
        inp = _GramInputs(qu, kv, gram, *shape)
        grads = None
        if any(ctx.needs_input_grad[:5]):
            grads = _Grads(torch.zeros_like(qu), torch.zeros_like(kv), torch.zeros_like(gram),
                           torch.zeros_like(logit_scale), torch.zeros_like(logit_bias))
        loss = _gram_pass(inp, logit_scale, logit_bias, blocks, offset, grads) / normalizer
        if grads is not None:
            ctx.save_for_backward(*grads)
        ctx.normalizer = normalizer
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        factor = grad / ctx.normalizer
        return tuple(g * factor for g in ctx.saved_tensors) + (None,) * 4


# -- plain mode: text blocks under activation checkpointing -----------------------------------

class _Plain(NamedTuple):
    kh: Tensor  # [Bi, K, H, d]
    vh: Tensor  # [Bi, K, H, d]
    w: Tensor  # [E, E]
    qh: Tensor  # [Bt, H, d], divided by tau
    t: Tensor  # [Bt, E] unit targets


def _plain_inputs(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                  num_heads: int, tau: float) -> _Plain:
    dt = _compute_dtype(keys)
    bi, k, e = keys.shape
    h, d = num_heads, e // num_heads
    return _Plain(keys.to(dt).reshape(bi, k, h, d), values.to(dt).reshape(bi, k, h, d), w_o.to(dt),
                  (queries.to(dt) / tau).reshape(-1, h, d), targets.to(dt))


def _plain_scores(kh: Tensor, vh: Tensor, w: Tensor, qh: Tensor, t: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """Scores [Bi, c] of all images against one block of c texts."""
    attn = torch.softmax(torch.einsum("ikhd,jhd->ijhk", kh, qh), dim=-1)  # [Bi, c, H, K]
    z = torch.einsum("ijhk,ikhd->ijhd", attn, vh).flatten(2) @ w  # [Bi, c, E]
    return scale.exp() * torch.einsum("ije,je->ij", F.normalize(z, dim=-1), t) + bias


def _plain_loss(kh: Tensor, vh: Tensor, w: Tensor, qh: Tensor, t: Tensor, scale: Tensor, bias: Tensor,
                col0: int, offset: int) -> Tensor:
    s = _plain_scores(kh, vh, w, qh, t, scale, bias)
    bi, c = s.shape
    # Positives from the index: column (col0 + j) matches row i when col0 + j == offset + i.
    rows = torch.arange(bi, device=s.device)[:, None]
    cols = torch.arange(col0, col0 + c, device=s.device)[None, :]
    sign = torch.where(cols == rows + offset, 1.0, -1.0).to(s.dtype)
    return F.softplus(-sign * s).sum()


def _plain_blocks(p: _Plain, chunk: int):
    for start in range(0, p.qh.shape[0], chunk):
        yield start, p.qh[start:start + chunk], p.t[start:start + chunk]


# -- the backend ------------------------------------------------------------------------------

def chunked_loss(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                 logit_scale: Tensor, logit_bias: Tensor, *, num_heads: int, tau: float, offset: int,
                 normalizer: float, chunk_size: Optional[int] = None, mode: Optional[str] = None) -> Tensor:
    bi, k, e = keys.shape
    bt, dt = queries.shape[0], _compute_dtype(keys)
    scale, bias = logit_scale.to(dt), logit_bias.to(dt)
    if (mode or choose_mode(k, num_heads, e)) == "gram":
        inp = _gram_inputs(keys, values, w_o, queries, targets, num_heads, tau)
        blocks = gram_blocks(bi, bt, k, num_heads, chunk_size)
        return _FusedGram.apply(inp.qu, inp.kv, inp.gram, scale, bias, (num_heads, k), offset, normalizer, blocks)
    p = _plain_inputs(keys, values, w_o, queries, targets, num_heads, tau)
    total = p.kh.new_zeros(())
    for start, qh, t in _plain_blocks(p, chunk_size or default_chunk(bi, k, num_heads, e, bt)):
        args = (p.kh, p.vh, p.w, qh, t, scale, bias, start, offset)
        if torch.is_grad_enabled():
            total = total + checkpoint(_plain_loss, *args, use_reentrant=False)
        else:
            total = total + _plain_loss(*args)
    return total / normalizer


def chunked_scores(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                   logit_scale: Tensor, logit_bias: Tensor, *, num_heads: int, tau: float,
                   chunk_size: Optional[int] = None, mode: Optional[str] = None) -> Tensor:
    """Scores [Bi, Bt]. Without gradients (evaluation) gram mode runs the fused pass; with them,
    the plain formulation under autograd (it keeps every block for backward either way)."""
    bi, k, e = keys.shape
    bt, dt = queries.shape[0], _compute_dtype(keys)
    scale, bias = logit_scale.to(dt), logit_bias.to(dt)
    inputs = (keys, values, w_o, queries, targets, logit_scale, logit_bias)
    differentiable = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    if (mode or choose_mode(k, num_heads, e)) == "gram" and not differentiable:
        inp = _gram_inputs(keys, values, w_o, queries, targets, num_heads, tau)
        return _gram_pass(inp, scale, bias, gram_blocks(bi, bt, k, num_heads, chunk_size), None, None)
    p = _plain_inputs(keys, values, w_o, queries, targets, num_heads, tau)
    out = [_plain_scores(p.kh, p.vh, p.w, qh, t, scale, bias)
           for _, qh, t in _plain_blocks(p, chunk_size or default_chunk(bi, k, num_heads, e, bt))]
    return torch.cat(out, dim=1)
