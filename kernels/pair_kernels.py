"""Triton kernels of the fused pair head: forward (scores or loss) and backward.

In the forward, one program owns one tile: one image ``i`` against a block of ``BT`` texts. Per
tile and per head ``h`` the mixing is ordinary attention with the texts as queries and the K
mixture tokens as keys, so the whole softmax over K fits in the tile and nothing per pair ever
reaches global memory except, when training, two fp32 scalars (cos and ||z||) that the backward
turns into dL/ds.

Per tile, with a_b the attention weights of token block b (a head, or a KC-wide slice of a head
when K > KC) held in registers as a tuple of [BT, KC] tensors:

    logits_hk = <q_jh, key_ihk> / tau         softmax over k       -> a   (pass 1)
    num       = sum_hk a_hk <value_ihk, U_jh>  with U = t @ W_o^T  -> <z_ij, t_j>
    sq        = a^T G_i a                      with G_i = V'_i V'_i^T (per-image Gram of the values
                                               folded with W_o)    -> ||z_ij||^2       (pass 2)
    s         = exp(logit_scale) * num / ||z|| + logit_bias,  loss = softplus(-y s)

G_i is symmetric, so the forward only visits the blocks b' <= b (half the products).

The backward is split the way flash-attention's is, so that every output has one owner and
nothing is atomic (gradients are bitwise repeatable):

- image side, program (image i, part, split of the texts): loops over text blocks and keeps
  in registers dK of head h = part (parts 0..H-1: recomputes the weights and dA = dnum * P +
  2 dsq * (G a), runs the softmax backward, and adds dsq a a^T to dG's columns of head h, in
  global memory that only it touches, for the head pairs it owns: each pair once, about H/2
  per part) or dV of every head in turn (part H: needs only each head's own weights, so H heads
  of it cost about what one dK part costs), and writes them once;
- text side, program (text block, head h, part): loops over the images in order and keeps dQ
  (part 0) or dU (part 1) of head h in registers, then adds them once to the fp32 accumulators.

G couples the heads (W_o mixes them), so (G a) for head h needs every head's weights: the dK and
dQ parts recompute them one head at a time in a runtime loop, which keeps one head's [BT, K]
weights live (no spills) and the code small (the backward compiles in seconds at any H x K).
The price is compute: each of those programs recomputes the logits of all H heads. dL/ds comes
from the two scalars per pair (cos, ||z||) saved by the forward. Per-image (G) and per-text (U)
tensors are built and differentiated in PyTorch by ``llip_scale.kernels.pairs``.

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
# The same values as the kernels see them (a @jit function reads only constexpr globals).
_SCORES = tl.constexpr(MODE_SCORES)
_LOSS_STATS = tl.constexpr(MODE_LOSS_STATS)
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
        weights = _head_weights(q_ptr, k_ptr, rows, row_mask, h, n_tok, E, scale_log2, NC, D, BD, KC, BT, EVEN_D,
                                PREC)
        for c in tl.static_range(NC):
            a = weights[c]
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
_DYNAMIC = ["n_img", "n_txt", "offset", "out_stride", "stat_stride", "split_texts"]


@triton.jit(do_not_specialize=_DYNAMIC)
def _pairs_fwd_kernel(Q, U, Kx, V, G, Scale, Bias, Out, Cos, Nrm,
                      n_img, n_txt, n_tok, E, offset, scale_log2, out_stride, stat_stride,
                      H: tl.constexpr, NC: tl.constexpr, NB: tl.constexpr, NBK: tl.constexpr,
                      D: tl.constexpr, BD: tl.constexpr, KC: tl.constexpr, EVEN_D: tl.constexpr,
                      PREC: tl.constexpr, MODE: tl.constexpr, GROUP: tl.constexpr, BT: tl.constexpr):
    img, tb = _tile(n_img, n_txt, BT, GROUP)
    rows = tb * BT + tl.arange(0, BT)
    row_mask = rows < n_txt
    img64 = tl.cast(img, tl.int64)
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
    if MODE == _SCORES:
        tl.store(Out + img64 * stat_stride + rows, s, mask=row_mask)
    else:
        # softplus(-y s): y = +1 only at column offset + image (positives from the index).
        x = tl.where(rows == offset + img, -s, s)
        sp = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        tl.store(Out + img64 * out_stride + tb, tl.sum(tl.where(row_mask, sp, 0.0), 0))
        if MODE == _LOSS_STATS:
            tl.store(Cos + img64 * stat_stride + rows, cos, mask=row_mask)
            tl.store(Nrm + img64 * stat_stride + rows, norm, mask=row_mask)


@triton.jit
def _head_weights(q_ptr, k_ptr, rows, row_mask, h, n_tok, E, scale_log2,
                  NC: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr,
                  EVEN_D: tl.constexpr, PREC: tl.constexpr):
    """The attention weights of one head ``h`` (a runtime index): a tuple of NC fp32 [BT, KC]."""
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
    weights = ()
    for c in tl.static_range(NC):
        weights = weights + (exps[c] * inv_total[:, None],)
    return weights


@triton.jit
def _score_grads(Scale, Bias, GradScale, Cos, Nrm, img, rows, row_mask, offset, stat_stride):
    """(dL/dnum, dL/dsq) per text of one image, from the (cos, ||z||) saved by the forward:
    dL/ds = sigmoid(s) - [positive], times dL/dloss / normalizer; zero on masked texts."""
    img64 = tl.cast(img, tl.int64)
    cos = tl.load(Cos + img64 * stat_stride + rows, mask=row_mask, other=0.0)
    norm = tl.load(Nrm + img64 * stat_stride + rows, mask=row_mask, other=1.0)
    scale = tl.exp(tl.load(Scale).to(tl.float32))
    s = scale * cos + tl.load(Bias).to(tl.float32)
    g = tl.sigmoid(s) - tl.where(rows == offset + img, 1.0, 0.0)
    dcos = tl.where(row_mask, g * tl.load(GradScale), 0.0) * scale
    dnum = dcos / tl.maximum(norm, EPS)  # cos = num / ||z||
    dsq = tl.where(norm > EPS, -0.5 * dcos * cos / (norm * norm), 0.0)  # ||z|| = sqrt(sq)
    return dnum, dsq


@triton.jit
def _owns_dg_block(h, h2, H: tl.constexpr):
    """Whether the dK program of head h adds the dG block of the head pair (h2, h). Each pair
    {h, h2} has one owner: a round robin by (h2 - h) mod H, ties (H even, heads H/2 apart) to
    the lower head. So each program adds 1 + (H - 1) // 2 blocks, or one more: not h + 1, which
    left the last head's program with H of them and the first with one."""
    s = (h2 - h + H) % H
    return (s == 0) | (2 * s < H) | ((2 * s == H) & (h < h2))


@triton.jit
def _pair_grads(Q, U, k_ptr, v_ptr, g_ptr, dg_ptr, rows, row_mask, h, dnum, dsq, n_tok, E, scale_log2, inv_tau,
                H: tl.constexpr, NC: tl.constexpr, NBK: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                KC: tl.constexpr, BT: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                WITH_DG: tl.constexpr):
    """For one image, a block of texts and one head h: the gradient of the logits <q, key>
    (1/tau folded in), a tuple of NC fp32 [BT, KC].

    dA = dnum * P + 2 dsq * (G a) needs the weights of every head (G couples them through W_o):
    they are recomputed one head at a time, so only one head's weights are live at once.
    If WITH_DG, the same loop also adds dsq a a^T to dG's columns of head h, for the row blocks
    of the heads h2 that ``_owns_dg_block`` gives to head h (each pair of heads once, off-diagonal
    blocks doubled; within head h the upper block triangle: all the symmetric backward of
    G = V' V'^T needs). The caller owns those columns, so it reads, adds and writes them back."""
    dt = Q.dtype.element_ty
    r = tl.arange(0, KC)
    ga = ()  # (G a) on the blocks of head h
    for c in tl.static_range(NC):
        ga = ga + (tl.zeros([BT, KC], dtype=tl.float32),)
    if WITH_DG:  # dG needs head h's weights before the loop
        own = _head_weights(Q, k_ptr, rows, row_mask, h, n_tok, E, scale_log2, NC, D, BD, KC, BT, EVEN_D, PREC)
        own_dsq = ()
        for c in tl.static_range(NC):
            own_dsq = own_dsq + ((dsq[:, None] * own[c]).to(dt),)
        # The previous text block's writes to dG become visible to every thread of the program.
        tl.debug_barrier()
    else:  # head h's weights are taken from the loop
        own = ga
    for h2 in range(0, E // D):  # E // D = H as a runtime bound: never unrolled, so compiles stay short
        other = _head_weights(Q, k_ptr, rows, row_mask, h2, n_tok, E, scale_log2, NC, D, BD, KC, BT, EVEN_D,
                              PREC)
        new_ga = ()
        for c in tl.static_range(NC):
            acc = ga[c]
            for c2 in tl.static_range(NC):
                acc = tl.dot(other[c2].to(dt), _gram_block(g_ptr, h2 * NC + c2, h * NC + c, NBK, KC), acc,
                             input_precision=PREC)
            new_ga = new_ga + (acc,)
        ga = new_ga
        if WITH_DG:
            if _owns_dg_block(h, h2, H):
                other_head = h2 != h
                for c in tl.static_range(NC):
                    for c2 in tl.static_range(NC):
                        blk = tl.dot(tl.trans(other[c2].to(dt)), own_dsq[c], input_precision=PREC)
                        ptrs = (dg_ptr + ((h2 * NC + c2) * KC + r)[:, None] * NBK
                                + ((h * NC + c) * KC + r)[None, :])
                        if c2 < c:
                            tl.store(ptrs, tl.load(ptrs) + 2.0 * blk)
                        elif c2 == c:
                            tl.store(ptrs, tl.load(ptrs) + tl.where(other_head, 2.0, 1.0) * blk)
                        else:  # below the diagonal within head h: only for the other heads
                            keep = (tl.zeros([KC, KC], dtype=tl.int32) + h2) != h
                            tl.store(ptrs, tl.load(ptrs, mask=keep, other=0.0) + 2.0 * blk, mask=keep)
        else:
            mine = h2 == h
            new_own = ()
            for c in tl.static_range(NC):
                new_own = new_own + (tl.where(mine, other[c], own[c]),)
            own = new_own
    d_attn = ()
    row_dot = tl.zeros([BT], dtype=tl.float32)
    for c in tl.static_range(NC):
        p = _block_dots(U, v_ptr, rows, row_mask, h, c, n_tok, E, D, BD, KC, BT, EVEN_D, PREC)
        da = dnum[:, None] * p + 2.0 * dsq[:, None] * ga[c]
        row_dot += tl.sum(own[c] * da, 1)
        d_attn = d_attn + (da,)
    d_logits = ()
    for c in tl.static_range(NC):
        d_logits = d_logits + (own[c] * (d_attn[c] - row_dot[:, None]) * inv_tau,)
    return d_logits


@triton.jit
def _image_side(Q, U, k_ptr, v_ptr, g_ptr, dg_ptr, Scale, Bias, GradScale, Cos, Nrm, img, h, t_start, t_end,
                n_tok, E, offset, scale_log2, inv_tau, stat_stride,
                H: tl.constexpr, NC: tl.constexpr, NBK: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                ND: tl.constexpr, KC: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
                VALUES: tl.constexpr):
    """Loops over the texts [t_start, t_end) in blocks of BT; returns dK (or, if VALUES, dV) of
    head h for this image as a tuple of NC * ND fp32 [KC, BD] tiles; dK also adds to dG.
    dV = sum_j dnum a^T U needs only head h's own weights, so it runs apart from the coupled dK
    (one set of accumulators live at a time)."""
    dt = Q.dtype.element_ty
    acc = ()
    for i in tl.static_range(NC * ND):
        acc = acc + (tl.zeros([KC, BD], dtype=tl.float32),)
    for t0 in range(t_start, t_end, BT):
        rows = t0 + tl.arange(0, BT)
        row_mask = rows < t_end
        dnum, dsq = _score_grads(Scale, Bias, GradScale, Cos, Nrm, img, rows, row_mask, offset, stat_stride)
        if VALUES:
            own = _head_weights(Q, k_ptr, rows, row_mask, h, n_tok, E, scale_log2, NC, D, BD, KC, BT, EVEN_D, PREC)
            grads = ()
            for c in tl.static_range(NC):
                grads = grads + (own[c] * dnum[:, None],)
            src = U
        else:
            grads = _pair_grads(Q, U, k_ptr, v_ptr, g_ptr, dg_ptr, rows, row_mask, h, dnum, dsq, n_tok, E,
                                scale_log2, inv_tau, H, NC, NBK, D, BD, KC, BT, EVEN_D, PREC, True)
            src = Q
        new = ()
        for c in tl.static_range(NC):
            for j in tl.static_range(ND):
                dims = j * BD + tl.arange(0, BD)
                tmask = row_mask[:, None] & (dims < D)[None, :]
                x = tl.load(src + rows[:, None] * E + (h * D + dims)[None, :], mask=tmask, other=0.0)
                new = new + (tl.dot(tl.trans(grads[c].to(dt)), x, acc[c * ND + j], input_precision=PREC),)
        acc = new
    return acc


@triton.jit
def _store_image_side(out_ptr, acc, h, n_tok, E, NC: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                      ND: tl.constexpr, KC: tl.constexpr):
    for c in tl.static_range(NC):
        toks = c * KC + tl.arange(0, KC)
        for j in tl.static_range(ND):
            dims = j * BD + tl.arange(0, BD)
            kmask = (toks < n_tok)[:, None] & (dims < D)[None, :]
            tl.store(out_ptr + toks[:, None] * E + (h * D + dims)[None, :], acc[c * ND + j], mask=kmask)


@triton.jit(do_not_specialize=_DYNAMIC)
def _pairs_bwd_image_kernel(Q, U, Kx, V, G, Scale, Bias, GradScale, Cos, Nrm, dK, dV, dG,
                            n_img, n_txt, n_tok, E, offset, scale_log2, inv_tau, stat_stride, split_texts,
                            H: tl.constexpr, NC: tl.constexpr, NBK: tl.constexpr, D: tl.constexpr,
                            BD: tl.constexpr, ND: tl.constexpr, KC: tl.constexpr, EVEN_D: tl.constexpr,
                            PREC: tl.constexpr, BT: tl.constexpr):
    """Image side: program (image, part, split s) loops over the texts of split s in blocks of
    BT. Parts 0..H-1 keep dK of head ``part`` in registers (and add to dG's columns of that head,
    in global memory only they touch); part H computes dV of every head, one head after the
    other, so that it does about the work of one dK part (H times one head's weights and dV
    product, against one dK part's H heads' weights and (G a)), and every program of the launch
    takes about as long. Each program writes its outputs once; each split writes its own partial
    slice ([S, n_img, ...]), which the caller sums in a fixed order, so nothing is atomic. A
    runtime branch keeps only one part's registers live."""
    img = tl.program_id(0)
    part = tl.program_id(1)
    split = tl.program_id(2)
    img64 = tl.cast(img, tl.int64)
    k_ptr = Kx + img64 * n_tok * E
    v_ptr = V + img64 * n_tok * E
    g_ptr = G + img64 * NBK * NBK
    out64 = tl.cast(split, tl.int64) * n_img + img64
    t_start = split * split_texts
    t_end = tl.minimum(n_txt, t_start + split_texts)
    if part < H:
        acc = _image_side(Q, U, k_ptr, v_ptr, g_ptr, dG + out64 * NBK * NBK, Scale, Bias, GradScale, Cos, Nrm,
                          img, part, t_start, t_end, n_tok, E, offset, scale_log2, inv_tau, stat_stride,
                          H, NC, NBK, D, BD, ND, KC, EVEN_D, PREC, BT, False)
        _store_image_side(dK + out64 * n_tok * E, acc, part, n_tok, E, NC, D, BD, ND, KC)
    else:
        for h in range(0, E // D):  # a runtime loop, as in _pair_grads: one head's dV live at a time
            acc = _image_side(Q, U, k_ptr, v_ptr, g_ptr, g_ptr, Scale, Bias, GradScale, Cos, Nrm,
                              img, h, t_start, t_end, n_tok, E, offset, scale_log2, inv_tau, stat_stride,
                              H, NC, NBK, D, BD, ND, KC, EVEN_D, PREC, BT, True)
            _store_image_side(dV + out64 * n_tok * E, acc, h, n_tok, E, NC, D, BD, ND, KC)


@triton.jit
def _text_side(Q, U, Kx, V, G, Scale, Bias, GradScale, Cos, Nrm, rows, row_mask, h, n_img, n_tok, E, offset,
               scale_log2, inv_tau, stat_stride,
               H: tl.constexpr, NC: tl.constexpr, NBK: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
               ND: tl.constexpr, KC: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
               VALUES: tl.constexpr):
    """Loops over the images in order; returns dQ (or, if VALUES, dU) of head h for these texts
    as a tuple of ND fp32 [BT, BD] tiles."""
    dt = Q.dtype.element_ty
    r = tl.arange(0, KC)
    acc = ()
    for j in tl.static_range(ND):
        acc = acc + (tl.zeros([BT, BD], dtype=tl.float32),)
    for img in range(0, n_img):
        img64 = tl.cast(img, tl.int64)
        k_ptr = Kx + img64 * n_tok * E
        v_ptr = V + img64 * n_tok * E
        dnum, dsq = _score_grads(Scale, Bias, GradScale, Cos, Nrm, img, rows, row_mask, offset, stat_stride)
        if VALUES:
            own = _head_weights(Q, k_ptr, rows, row_mask, h, n_tok, E, scale_log2, NC, D, BD, KC, BT, EVEN_D, PREC)
            grads = ()
            for c in tl.static_range(NC):
                grads = grads + (own[c] * dnum[:, None],)
            src = v_ptr
        else:
            g_ptr = G + img64 * NBK * NBK
            grads = _pair_grads(Q, U, k_ptr, v_ptr, g_ptr, g_ptr, rows, row_mask, h, dnum, dsq, n_tok, E,
                                scale_log2, inv_tau, H, NC, NBK, D, BD, KC, BT, EVEN_D, PREC, False)
            src = k_ptr
        new = ()
        for j in tl.static_range(ND):
            dims = j * BD + tl.arange(0, BD)
            a = acc[j]
            for c in tl.static_range(NC):
                toks = c * KC + r
                kmask = (toks < n_tok)[:, None] & (dims < D)[None, :]
                x = tl.load(src + toks[:, None] * E + (h * D + dims)[None, :], mask=kmask, other=0.0)
                a = tl.dot(grads[c].to(dt), x, a, input_precision=PREC)
            new = new + (a,)
        acc = new
    return acc


@triton.jit
def _add_text_side(out_ptr, acc, rows, row_mask, h, E, D: tl.constexpr, BD: tl.constexpr, ND: tl.constexpr):
    for j in tl.static_range(ND):
        dims = j * BD + tl.arange(0, BD)
        tmask = row_mask[:, None] & (dims < D)[None, :]
        ptrs = out_ptr + rows[:, None] * E + (h * D + dims)[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=tmask, other=0.0) + acc[j], mask=tmask)


@triton.jit(do_not_specialize=_DYNAMIC)
def _pairs_bwd_text_kernel(Q, U, Kx, V, G, Scale, Bias, GradScale, Cos, Nrm, dQ, dU,
                           n_img, n_txt, n_tok, E, offset, scale_log2, inv_tau, stat_stride,
                           H: tl.constexpr, NC: tl.constexpr, NBK: tl.constexpr, D: tl.constexpr,
                           BD: tl.constexpr, ND: tl.constexpr, KC: tl.constexpr, EVEN_D: tl.constexpr,
                           PREC: tl.constexpr, BT: tl.constexpr):
    """Text side: program (text block, 2 * head h + part) loops over the images in order and
    keeps dQ (part 0) or dU (part 1) of head h for its BT texts in registers, then adds them once
    to the fp32 accumulators (which only this program touches)."""
    tb = tl.program_id(0)
    h = tl.program_id(1) // 2
    rows = tb * BT + tl.arange(0, BT)
    row_mask = rows < n_txt
    if tl.program_id(1) % 2 == 0:
        acc = _text_side(Q, U, Kx, V, G, Scale, Bias, GradScale, Cos, Nrm, rows, row_mask, h, n_img, n_tok, E,
                         offset, scale_log2, inv_tau, stat_stride, H, NC, NBK, D, BD, ND, KC, EVEN_D, PREC, BT,
                         False)
        _add_text_side(dQ, acc, rows, row_mask, h, E, D, BD, ND)
    else:
        acc = _text_side(Q, U, Kx, V, G, Scale, Bias, GradScale, Cos, Nrm, rows, row_mask, h, n_img, n_tok, E,
                         offset, scale_log2, inv_tau, stat_stride, H, NC, NBK, D, BD, ND, KC, EVEN_D, PREC, BT,
                         True)
        _add_text_side(dU, acc, rows, row_mask, h, E, D, BD, ND)
