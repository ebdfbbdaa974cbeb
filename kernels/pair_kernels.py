"""Triton kernels of the fused pair head: forward (scores or loss) and backward.

One program owns one tile: one image ``i`` against a block of ``BT`` texts. Per tile and per head
``h`` the mixing is ordinary attention with the texts as queries and the K mixture tokens as keys,
so the whole softmax over K fits in the tile and nothing per pair ever reaches global memory
except, when training, two fp32 scalars (cos and ||z||) that the backward turns into dL/ds.

Per tile, with a_b the attention weights of token block b (a head, or a KC-wide slice of a head
when K > KC) held in registers as a tuple of [BT, KC] tensors:

    logits_hk = <q_jh, key_ihk> / tau         softmax over k       -> a   (pass 1)
    num       = sum_hk a_hk <value_ihk, U_jh>  with U = t @ W_o^T  -> <z_ij, t_j>
    sq        = a^T G_i a                      with G_i = V'_i V'_i^T (per-image Gram of the values
                                               folded with W_o)    -> ||z_ij||^2       (pass 2)
    s         = exp(logit_scale) * num / ||z|| + logit_bias,  loss = softplus(-y s)

G_i is symmetric, so the forward only visits the blocks b' <= b (half the products). The
backward recomputes pass 1, forms dA = dnum * P + 2 dsq * (G a), runs the per-head softmax
backward and adds its contributions with fp32 atomics: queries and U (text side), keys, values and
the upper block triangle of dG (image side). Per-image (G) and per-text (U) tensors are built and
differentiated in PyTorch by ``llip_scale.kernels.pairs``.

Block sizes are powers of two with masks: BT texts per tile, KC tokens per block (K padded to a
multiple of KC in the layout of G only), BD head dims per step of the reduction over d (the
largest power of two dividing d, so d = 160 or 96 runs without padding). Every ``tl.dot`` has
all dimensions >= 16 and accumulates in fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

MODE_SCORES = 0  # write s [Bi, Bt]
MODE_LOSS = 1  # write the loss sum of each tile
MODE_LOSS_STATS = 2  # ... and cos, ||z|| per pair for the backward
MIN_BT = 16  # the smallest text block: partial-sum buffers are laid out for it
EPS = tl.constexpr(1e-12)  # F.normalize's floor on ||z||


@triton.jit
def _tile(n_img, n_txt, BT: tl.constexpr, GROUP: tl.constexpr):
    """Program id -> (image, text block), GROUP images at a time so that the programs running
    together share a few images' G and a band of text blocks in L2."""
    pid = tl.program_id(0)
    n_tb = tl.cdiv(n_txt, BT)
    per_group = GROUP * n_tb
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_img - first, GROUP)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def _block_dots(a_ptr, b_ptr, rows, row_mask, h, c, n_tok, E,
                D: tl.constexpr, BD: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr,
                EVEN_D: tl.constexpr, PREC: tl.constexpr):
    """[BT, KC] = a[rows, head h] @ b[tokens of block c, head h]^T, reduced over d in BD steps.

    (a, b) is (queries, keys) for the logits or (U, values) for the numerator terms.
    """
    toks = c * KC + tl.arange(0, KC)
    tok_mask = toks < n_tok
    acc = tl.zeros([BT, KC], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dims = d0 + tl.arange(0, BD)
        cols = h * D + dims
        if EVEN_D:
            am = row_mask[:, None]
            bm = tok_mask[:, None]
        else:
            am = row_mask[:, None] & (dims < D)[None, :]
            bm = tok_mask[:, None] & (dims < D)[None, :]
        x = tl.load(a_ptr + rows[:, None] * E + cols[None, :], mask=am, other=0.0)
        y = tl.load(b_ptr + toks[:, None] * E + cols[None, :], mask=bm, other=0.0)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PREC)
    return acc


@triton.jit
def _attention(q_ptr, k_ptr, u_ptr, v_ptr, rows, row_mask, n_tok, E, scale_log2,
               H: tl.constexpr, NC: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
               KC: tl.constexpr, BT: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
               WITH_NUM: tl.constexpr):
    """Pass 1: the attention weights of every block (a tuple of H*NC [BT, KC] tensors in the
    input dtype) and, if WITH_NUM, num = <z, t> per text (fp32 [BT])."""
    blocks = ()
    num = tl.zeros([BT], dtype=tl.float32)
    for h in tl.static_range(H):
        logits = ()
        row_max = tl.full([BT], float("-inf"), tl.float32)
        for c in tl.static_range(NC):
            lg = _block_dots(q_ptr, k_ptr, rows, row_mask, h, c, n_tok, E, D, BD, KC, BT, EVEN_D, PREC)
            toks = c * KC + tl.arange(0, KC)
            lg = tl.where((toks < n_tok)[None, :], lg * scale_log2, float("-inf"))
            row_max = tl.maximum(row_max, tl.max(lg, 1))
            logits = logits + (lg,)
        total = tl.zeros([BT], dtype=tl.float32)
        exps = ()
        for c in tl.static_range(NC):
            ex = tl.exp2(logits[c] - row_max[:, None])
            total += tl.sum(ex, 1)
            exps = exps + (ex,)
        inv_total = 1.0 / total
        for c in tl.static_range(NC):
            a = exps[c] * inv_total[:, None]
            if WITH_NUM:
                p = _block_dots(u_ptr, v_ptr, rows, row_mask, h, c, n_tok, E, D, BD, KC, BT, EVEN_D, PREC)
                num += tl.sum(a * p, 1)
            blocks = blocks + (a.to(q_ptr.dtype.element_ty),)
    return blocks, num


@triton.jit
def _gram_block(g_ptr, row_block, col_block, NBK: tl.constexpr, KC: tl.constexpr):
    r = tl.arange(0, KC)
    return tl.load(g_ptr + (row_block * KC + r)[:, None] * NBK + (col_block * KC + r)[None, :])


# Sizes that change between calls are not specialised on (their divisibility), so that one
# compiled kernel serves every batch size of a model; E and K stay specialised.
_DYNAMIC = ["n_img", "n_txt", "offset", "out_stride", "stat_stride"]


@triton.jit(do_not_specialize=_DYNAMIC)
def _pairs_fwd_kernel(Q, U, Kx, V, G, Scale, Bias, Out, Cos, Nrm,
                      n_img, n_txt, n_tok, E, offset, scale_log2, out_stride, stat_stride,
                      H: tl.constexpr, NC: tl.constexpr, NB: tl.constexpr, NBK: tl.constexpr,
                      D: tl.constexpr, BD: tl.constexpr, KC: tl.constexpr, EVEN_D: tl.constexpr,
                      PREC: tl.constexpr, MODE: tl.constexpr, GROUP: tl.constexpr, BT: tl.constexpr):
    img, tb = _tile(n_img, n_txt, BT, GROUP)
    rows = tb * BT + tl.arange(0, BT)
    row_mask = rows < n_txt
    img64 = img.to(tl.int64)
    k_ptr = Kx + img64 * n_tok * E
    v_ptr = V + img64 * n_tok * E
    g_ptr = G + img64 * NBK * NBK

    blocks, num = _attention(Q, k_ptr, U, v_ptr, rows, row_mask, n_tok, E, scale_log2,
                             H, NC, D, BD, KC, BT, EVEN_D, PREC, True)
    # Pass 2: sq = sum_b a_b^T (G_bb a_b + 2 sum_{b' < b} G_bb' a_b'), G symmetric.
    sq = tl.zeros([BT], dtype=tl.float32)
    for b in tl.static_range(NB):
        off = tl.zeros([BT, KC], dtype=tl.float32)
        for b2 in tl.static_range(b):
            off = tl.dot(blocks[b2], _gram_block(g_ptr, b2, b, NBK, KC), off, input_precision=PREC)
        y = tl.dot(blocks[b], _gram_block(g_ptr, b, b, NBK, KC), 2.0 * off, input_precision=PREC)
        sq += tl.sum(y * blocks[b].to(tl.float32), 1)

    norm = tl.sqrt(tl.maximum(sq, 0.0))
    cos = num / tl.maximum(norm, EPS)
    s = tl.exp(tl.load(Scale).to(tl.float32)) * cos + tl.load(Bias).to(tl.float32)
    if MODE == 0:
        tl.store(Out + img64 * stat_stride + rows, s, mask=row_mask)
    else:
        # softplus(-y s): y = +1 only at column offset + image (positives from the index).
        x = tl.where(rows == offset + img, -s, s)
        sp = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        tl.store(Out + img64 * out_stride + tb, tl.sum(tl.where(row_mask, sp, 0.0), 0))
        if MODE == 2:
            tl.store(Cos + img64 * stat_stride + rows, cos, mask=row_mask)
            tl.store(Nrm + img64 * stat_stride + rows, norm, mask=row_mask)


@triton.jit(do_not_specialize=_DYNAMIC)
def _pairs_bwd_kernel(Q, U, Kx, V, G, Scale, Bias, GradScale, Cos, Nrm,
                      dQ, dU, dK, dV, dG, dSB,
                      n_img, n_txt, n_tok, E, offset, scale_log2, inv_tau, out_stride, stat_stride,
                      H: tl.constexpr, NC: tl.constexpr, NB: tl.constexpr, NBK: tl.constexpr,
                      D: tl.constexpr, BD: tl.constexpr, KC: tl.constexpr, EVEN_D: tl.constexpr,
                      PREC: tl.constexpr, GROUP: tl.constexpr, BT: tl.constexpr):
    img, tb = _tile(n_img, n_txt, BT, GROUP)
    rows = tb * BT + tl.arange(0, BT)
    row_mask = rows < n_txt
    img64 = img.to(tl.int64)
    k_ptr = Kx + img64 * n_tok * E
    v_ptr = V + img64 * n_tok * E
    g_ptr = G + img64 * NBK * NBK
    dk_ptr = dK + img64 * n_tok * E
    dv_ptr = dV + img64 * n_tok * E
    dg_ptr = dG + img64 * NBK * NBK
    dt = Q.dtype.element_ty

    # dL/ds from the saved (cos, ||z||): sigmoid(s) - [positive], times dL/dloss / normalizer.
    cos = tl.load(Cos + img64 * stat_stride + rows, mask=row_mask, other=0.0)
    norm = tl.load(Nrm + img64 * stat_stride + rows, mask=row_mask, other=1.0)
    scale = tl.exp(tl.load(Scale).to(tl.float32))
    s = scale * cos + tl.load(Bias).to(tl.float32)
    g = tl.sigmoid(s) - tl.where(rows == offset + img, 1.0, 0.0)
    g = tl.where(row_mask, g * tl.load(GradScale), 0.0)
    tl.store(dSB + (img64 * out_stride + tb) * 2, tl.sum(g * scale * cos, 0))
    tl.store(dSB + (img64 * out_stride + tb) * 2 + 1, tl.sum(g, 0))
    dcos = g * scale
    dnum = dcos / tl.maximum(norm, EPS)  # cos = num / ||z||
    dsq = tl.where(norm > EPS, -0.5 * dcos * cos / (norm * norm), 0.0)  # ||z|| = sqrt(sq)

    blocks, num = _attention(Q, k_ptr, U, v_ptr, rows, row_mask, n_tok, E, scale_log2,
                             H, NC, D, BD, KC, BT, EVEN_D, PREC, False)
    r = tl.arange(0, KC)
    for h in tl.static_range(H):
        # dA = dnum * P + 2 dsq * (G a), then the softmax backward over the K tokens of head h.
        d_attn = ()
        row_dot = tl.zeros([BT], dtype=tl.float32)
        for c in tl.static_range(NC):
            y = tl.zeros([BT, KC], dtype=tl.float32)
            for b2 in tl.static_range(NB):
                y = tl.dot(blocks[b2], _gram_block(g_ptr, b2, h * NC + c, NBK, KC), y, input_precision=PREC)
            p = _block_dots(U, v_ptr, rows, row_mask, h, c, n_tok, E, D, BD, KC, BT, EVEN_D, PREC)
            da = dnum[:, None] * p + 2.0 * dsq[:, None] * y
            row_dot += tl.sum(blocks[h * NC + c].to(tl.float32) * da, 1)
            d_attn = d_attn + (da,)
        d_logits = ()  # gradient of <q, key> (the 1/tau folded in)
        weights = ()  # dnum * a: the numerator's weight on each value / U
        for c in tl.static_range(NC):
            a = blocks[h * NC + c].to(tl.float32)
            d_logits = d_logits + ((a * (d_attn[c] - row_dot[:, None]) * inv_tau).to(dt),)
            weights = weights + ((a * dnum[:, None]).to(dt),)

        for d0 in range(0, D, BD):
            dims = d0 + tl.arange(0, BD)
            cols = h * D + dims
            dmask = dims < D
            tmask = row_mask[:, None] & dmask[None, :]
            q = tl.load(Q + rows[:, None] * E + cols[None, :], mask=tmask, other=0.0)
            u = tl.load(U + rows[:, None] * E + cols[None, :], mask=tmask, other=0.0)
            gq = tl.zeros([BT, BD], dtype=tl.float32)
            gu = tl.zeros([BT, BD], dtype=tl.float32)
            for c in tl.static_range(NC):
                toks = c * KC + r
                kmask = (toks < n_tok)[:, None] & dmask[None, :]
                kv_off = toks[:, None] * E + cols[None, :]
                key = tl.load(k_ptr + kv_off, mask=kmask, other=0.0)
                val = tl.load(v_ptr + kv_off, mask=kmask, other=0.0)
                gq = tl.dot(d_logits[c], key, gq, input_precision=PREC)
                gu = tl.dot(weights[c], val, gu, input_precision=PREC)
                tl.atomic_add(dk_ptr + kv_off, tl.dot(tl.trans(d_logits[c]), q, input_precision=PREC),
                              mask=kmask, sem="relaxed")
                tl.atomic_add(dv_ptr + kv_off, tl.dot(tl.trans(weights[c]), u, input_precision=PREC),
                              mask=kmask, sem="relaxed")
            t_off = rows[:, None] * E + cols[None, :]
            tl.atomic_add(dQ + t_off, gq, mask=tmask, sem="relaxed")
            tl.atomic_add(dU + t_off, gu, mask=tmask, sem="relaxed")

        # dG += dsq a a^T, upper block triangle only (off-diagonal blocks doubled): the caller
        # symmetrises, which is all the backward of G = V' V'^T needs.
        # (The block index h * NC + c is spelled out: a name bound to it would not stay constexpr.)
        for c in tl.static_range(NC):
            x = (dsq[:, None] * blocks[h * NC + c].to(tl.float32)).to(dt)
            for b2 in tl.static_range(h * NC + c + 1):
                blk = tl.dot(tl.trans(blocks[b2]), x, input_precision=PREC)
                if b2 < h * NC + c:
                    blk = 2.0 * blk
                tl.atomic_add(dg_ptr + (b2 * KC + r)[:, None] * NBK + ((h * NC + c) * KC + r)[None, :], blk,
                              sem="relaxed")
