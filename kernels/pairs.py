"""The ``triton`` pair backend: fused kernels behind a ``torch.autograd.Function``.

Importing this module registers the backend with ``llip_scale.pairs``. Data flow of one call:

    forward:  U = t @ W_o^T [Bt, E]  (once)
              for each chunk of images:  V' = values folded with W_o,  G = V' V'^T [c, HK', HK']
                  fused kernel over (image, text block) tiles -> loss sum per tile
                  (+ cos, ||z|| per pair [2, Bi, Bt] fp32 when a gradient is needed)
    backward: recompute U; for each chunk of texts, for each chunk of images: recompute V', G;
              image-side kernel -> dK, dV [S, c_i, K, E], dG [S, c_i, HK', HK'] (one partial per
              split S of the texts), text-side kernel -> dQ, dU [c_t, E] (fp32, each program adds
              its own rows once); then in PyTorch (fp32) dG -> dV, dW_o per image chunk and
              dU -> dt, dW_o per text chunk; dlogit_scale/bias from the saved (cos, ||z||).
              Every sum runs in a fixed order and nothing is atomic: gradients are bitwise
              repeatable.

Nothing of size Bi x Bt x K or Bi x Bt x E is ever allocated; G and dG exist for one chunk of
images at a time and the fp32 text accumulators for one chunk of texts, both sized so that the
extra memory stays within twice the size of the inputs (``plan_chunks``, ``workspace_bytes``).
HK' = H * K rounded up to the token block KC per head (zero rows and columns of G).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (correctness only: the
interpreter costs milliseconds per program; ``chunked`` is the CPU path).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from llip_scale.kernels import pair_kernels as pk
from llip_scale.pairs.chunked import chunked_scores

__all__ = ["triton_loss", "triton_scores", "KernelPlan", "make_plan", "LaunchConfig", "launch_configs", "Chunks",
           "plan_chunks", "workspace_bytes", "interpreting", "image_side_parts", "dg_blocks_per_head",
           "image_side_macs"]

GROUP = 8  # images per band of the program order (L2 reuse of G and the text blocks)
# Largest token block: a G block of KC x KC stays a small dot operand (fp32 takes twice the room).
MAX_KC_HALF = 128
MAX_KC_FP32 = 64
# fp32 dots with input_precision="ieee" run on the FMA units, whose operand layout gives each
# thread whole KC-long columns of the KC x KC Gram blocks: fp32 takes the smallest token block
# (from 16) that keeps the forward's unrolled Gram pass at most this many blocks (NB^2 / 2 block
# products, so compile time). KC = 16 keeps the spills of the zoo's B and L/14 heads under 100
# bytes; H/14 and G/14 (NB = 32 at KC = 16) take KC = 32 and spill kilobytes in the forward
# (benchmarks/RESULTS.md): fp32 is the tests' dtype, the zoo trains in bf16.
MAX_NB_FP32 = 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelPlan:
    """Static shape parameters of one specialisation of the kernels."""
    num_heads: int  # H
    head_dim: int  # D = E / H
    tokens: int  # K
    kc: int  # tokens per block (power of two >= 16)
    nc: int  # blocks per head
    bd: int  # head dims per reduction step (power of two >= 16)
    prec: str  # tl.dot input precision

    @property
    def nb(self) -> int:
        return self.num_heads * self.nc

    @property
    def nbk(self) -> int:  # rows of the padded Gram matrix
        return self.nb * self.kc

    @property
    def even_d(self) -> bool:
        return self.head_dim % self.bd == 0

    @property
    def nd(self) -> int:  # reduction steps over d
        return triton.cdiv(self.head_dim, self.bd)

    def constexprs(self) -> dict:
        """Compile-time parameters of the forward kernel."""
        return dict(H=self.num_heads, NC=self.nc, NB=self.nb, NBK=self.nbk, D=self.head_dim, BD=self.bd,
                    KC=self.kc, EVEN_D=self.even_d, PREC=self.prec, GROUP=GROUP)

    def bwd_constexprs(self) -> dict:
        """Compile-time parameters of the two backward kernels."""
        return dict(H=self.num_heads, NC=self.nc, NBK=self.nbk, D=self.head_dim, BD=self.bd, ND=self.nd,
                    KC=self.kc, EVEN_D=self.even_d, PREC=self.prec)


def _head_dim_step(d: int) -> int:
    """Largest power of two dividing d (at most 64), so that d = 96 or 160 has no padding; heads
    narrower than 16 or with no such factor >= 16 are padded (masked) to one step."""
    step = d & -d
    if step >= 16:
        return min(step, 64)
    return min(64, max(16, triton.next_power_of_2(d)))


def make_plan(num_tokens: int, embed_dim: int, num_heads: int, dtype: torch.dtype) -> KernelPlan:
    max_kc = MAX_KC_FP32 if dtype == torch.float32 else MAX_KC_HALF
    kc = min(max(16, triton.next_power_of_2(num_tokens)), max_kc)
    if dtype == torch.float32:
        kc = min(kc, next((c for c in (16, 32, 64, 128) if num_heads * math.ceil(num_tokens / c) <= MAX_NB_FP32),
                          max_kc))
    d = embed_dim // num_heads
    prec = "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands
    return KernelPlan(num_heads, d, num_tokens, kc, math.ceil(num_tokens / kc), _head_dim_step(d), prec)


@dataclass(frozen=True)
class Chunks:
    """Images and texts per launch."""
    images: int
    texts: int


# Fixed chunk sizes (None: sized from the memory budget below). Small values exercise the chunk
# loops in tests.
IMAGE_CHUNK: Optional[int] = None
TEXT_CHUNK: Optional[int] = None
TEXT_ALIGN = 64  # text chunks start at multiples of the largest text block


def _sizes(bi: int, bt: int, plan: KernelPlan, e: int, elt: int) -> dict:
    """Bytes of the inputs and of everything the backend allocates, by what they scale with."""
    nbk, k = plan.nbk, plan.tokens
    return dict(
        inputs=(2 * bi * k * e + 2 * bt * e + e * e) * elt,
        fixed=(bt * e * elt  # U
               + 2 * bi * bt * 4  # cos, ||z|| per pair (fp32), kept from the forward
               + bi * triton.cdiv(bt, pk.MIN_BT) * 4  # loss per tile
               + e * e * 4),  # fp32 dW_o
        # G (input dtype and fp32), dG and its symmetrisation (fp32), V' and one head of dV' (fp32),
        # fp32 dK, dV, values and dvalues of the chunk, the extra partial dK, dV, dG of up to
        # MAX_TEXT_SPLITS splits, and two rows of temporaries for the logit scale and bias
        per_image=(nbk * nbk * (elt + 12) + (nbk + plan.nc * plan.kc) * e * 4 + 4 * k * e * 4
                   + (MAX_TEXT_SPLITS - 1) * (nbk * nbk + 2 * k * e) * 4 + 2 * bt * 4),
        per_text=4 * e * 4,  # fp32 dQ, dU, dU @ W_o and the targets
    )


def plan_chunks(bi: int, bt: int, plan: KernelPlan, e: int, elt: int) -> Chunks:
    """Chunks such that the backward's extra memory stays within twice the size of its inputs
    (unless the two fp32 scalars kept per pair alone exceed that): a third of what is left after
    the fixed terms goes to a chunk of images, the rest to the fp32 accumulators of a chunk of texts."""
    if TEXT_CHUNK is not None and TEXT_CHUNK % pk.MIN_BT:
        raise ValueError(f"TEXT_CHUNK={TEXT_CHUNK} must be a multiple of {pk.MIN_BT} (the per-tile sums are laid out for it)")
    z = _sizes(bi, bt, plan, e, elt)
    room = max(2 * z["inputs"] - z["fixed"], z["inputs"] // 4, 32 << 20)
    images = IMAGE_CHUNK or _balanced(bi, room // 3 // z["per_image"], 1)
    texts = TEXT_CHUNK or _balanced(bt, (room - images * z["per_image"]) // z["per_text"], TEXT_ALIGN)
    return Chunks(min(bi, images), min(bt, texts))


def _balanced(total: int, most: int, align: int) -> int:
    """Equal chunks of at most ``most`` (at least ``align``), rounded up to a multiple of ``align``."""
    count = triton.cdiv(total, max(align, most // align * align))
    return triton.cdiv(triton.cdiv(total, count), align) * align


def workspace_bytes(bi: int, bt: int, num_tokens: int, embed_dim: int, num_heads: int,
                    dtype: torch.dtype, backward: bool = True) -> int:
    """Peak bytes the backend allocates beyond its inputs and outputs (from its chunk plan)."""
    elt = torch.empty((), dtype=dtype).element_size()
    plan = make_plan(num_tokens, embed_dim, num_heads, dtype)
    c = plan_chunks(bi, bt, plan, embed_dim, elt)
    z = _sizes(bi, bt, plan, embed_dim, elt)
    if not backward:  # U, loss sums and one chunk's G and V' (+ the saved cos, ||z||)
        return (bt * embed_dim * elt + 2 * bi * bt * 4 + bi * triton.cdiv(bt, pk.MIN_BT) * 4
                + c.images * plan.nbk * (plan.nbk * (elt + 4) + embed_dim * 4))
    return z["fixed"] + c.images * z["per_image"] + c.texts * z["per_text"]


# -- per-image and per-text tensors (PyTorch, fp32) --------------------------------------------
def _fold(values: Tensor, w_o: Tensor, plan: KernelPlan) -> Tensor:
    """V'[i, h, k] = values[i, k, head h] @ W_o[head h rows], zero-padded to NC*KC tokens:
    [c, H, NC*KC, E] fp32."""
    c, k, e = values.shape
    h, d = plan.num_heads, plan.head_dim
    vh = values.float().reshape(c, k, h, d)
    folded = torch.einsum("ikhd,hde->ihke", vh, w_o.float().reshape(h, d, e))
    pad = plan.nc * plan.kc - k
    return torch.nn.functional.pad(folded, (0, 0, 0, pad)) if pad else folded


def _gram(folded: Tensor, plan: KernelPlan, dtype: torch.dtype) -> Tensor:
    flat = folded.reshape(folded.shape[0], plan.nbk, -1)
    return torch.bmm(flat, flat.transpose(1, 2)).to(dtype).contiguous()


def _gram_backward(dg: Tensor, folded: Tensor, values: Tensor, w_o: Tensor, plan: KernelPlan) -> tuple[Tensor, Tensor]:
    """Given d(loss)/dG (any D' with D' + D'^T = 2 dG), the gradients of values [c, K, E] and
    W_o [E, E] through G = V' V'^T, one head at a time (dV' of one head is the only E-wide temp)."""
    c, k, e = values.shape
    h, d, kpad = plan.num_heads, plan.head_dim, plan.nc * plan.kc
    dsym = dg + dg.transpose(1, 2)
    flat = folded.reshape(c, plan.nbk, e)
    vh = values.float().reshape(c, k, h, d)
    w3 = w_o.float().reshape(h, d, e)
    d_values = torch.empty(c, k, h, d, device=values.device, dtype=torch.float32)
    d_w = torch.empty(h, d, e, device=values.device, dtype=torch.float32)
    for head in range(h):
        d_folded = torch.bmm(dsym[:, head * kpad:head * kpad + k], flat)  # [c, K, E]
        d_values[:, :, head] = d_folded @ w3[head].t()
        d_w[head] = torch.einsum("ikd,ike->de", vh[:, :, head], d_folded)
    return d_values.reshape(c, k, e), d_w.reshape(e, e)


def _text_side(targets: Tensor, w_o: Tensor) -> Tensor:
    """U = t @ W_o^T, so that <mixed @ W_o, t> = <mixed, U>. In the input dtype (the matmul
    accumulates in fp32): an fp32 copy of the targets would cost more than U itself."""
    return (targets @ w_o.t()).contiguous()


# -- launches -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """Block size and launch options of one kernel."""
    bt: int  # texts per block
    num_warps: int
    num_stages: int

    def options(self) -> dict:
        return dict(BT=self.bt, num_warps=self.num_warps, num_stages=self.num_stages)


KERNELS = ("fwd", "bwd_image", "bwd_text")


DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def launch_configs(plan: KernelPlan, dtype, arch: int = 90, interpret: Optional[bool] = None
                   ) -> dict[str, LaunchConfig]:
    """The one config each kernel runs with for this head shape, input dtype (a torch dtype or
    its name: float32, float16, bfloat16) and GPU architecture (compute capability x 10: 90 for
    H100/H200, 80 for A100).

    Fixed rather than autotuned, so a shape compiles each kernel once and every run launches the
    same programs. Chosen from tools/kernel_resources.py (registers, spills, shared memory for
    sm_90 and sm_80): ``python tools/kernel_resources.py --chosen`` compiles exactly these, for
    every dtype. The forward holds a BT x HK' tile of weights, so its text block shrinks as H x K
    grows; the backward kernels hold one head's weights and fp32 accumulators of one head
    ([K, d] or [BT, d]).
    """
    if interpreting() if interpret is None else interpret:  # every program costs milliseconds
        return {name: LaunchConfig(pk.MIN_BT, 4, 1) for name in KERNELS}
    name = DTYPES.get(dtype, dtype)
    if name not in DTYPES.values():
        raise TypeError(f"no launch configs for dtype {dtype}")
    if name == "float32":
        # ieee fp32 dots run on the FMA units (no tensor cores), whose layouts hold far more per
        # thread than an MMA tile: the smallest text block, on every architecture.
        return dict(fwd=LaunchConfig(16, 8, 1), bwd_image=LaunchConfig(16, 8, 1), bwd_text=LaunchConfig(16, 8, 1))
    # float16 and bfloat16: the same tensor-core tiles (2-byte operands, fp32 accumulators). The
    # image side loads its key and query (or U) slices through two stages (cp.async: the next
    # head-dim step's tiles load while the current one's dot runs). At the zoo's heads that costs
    # up to 24 registers and 16 KiB of shared memory, no spills and no occupancy against the
    # earlier one-stage kernel (8 warps: two programs per SM at most 128 registers, one above;
    # every head stays on its side); with one stage the tiny head's image side spilled on sm_80.
    # Token blocks of 128 (K > 64) would take 365 KiB of shared memory on sm_80.
    image_stages = 2 if plan.kc <= 64 else 1
    if arch >= 90:  # Hopper: warpgroup MMA takes 64-row tiles
        fwd_bt = 64 if 64 * plan.nbk * 2 <= REGISTER_BYTES else 16
        return dict(fwd=LaunchConfig(fwd_bt, 8, 1), bwd_image=LaunchConfig(64, 8, image_stages),
                    bwd_text=LaunchConfig(64, 8, 1))
    # Ampere's mma.sync layouts hold more per thread at the same tile: smaller text blocks. The
    # image side takes 64 texts per block where one head's tokens fit one block of at most 32
    # (tiny, B/16, L/14 heads: 174 to 254 registers, no spills), which halves the keys and G
    # blocks each dK part loads per text; at K = 64, or two token blocks per head, it spills.
    # At K = 64 (H/14, G/14: 241 to 255 registers with 32-text blocks) the second stage is left
    # out: with Triton 3.6 it spills at the G/14 head.
    image_bt = 64 if plan.nc == 1 and plan.kc <= 32 else 32
    if plan.kc > 32:
        image_stages = 1
    return dict(fwd=LaunchConfig(16, 8, 1), bwd_image=LaunchConfig(image_bt, 8, image_stages),
                bwd_text=LaunchConfig(16, 8, 1))


def image_side_parts(plan: KernelPlan) -> int:
    """Programs of the image-side kernel per (image, split of the texts): H dK parts, one dV part."""
    return plan.num_heads + 1


def dg_blocks_per_head(num_heads: int) -> list[int]:
    """Head-pair blocks of dG that each dK part adds (pair_kernels._owns_dg_block): its own, then
    a round robin over the other heads, ties to the lower head."""
    h = num_heads
    return [1 + (h - 1) // 2 + (h % 2 == 0 and head < h // 2) for head in range(h)]


def image_side_macs(plan: KernelPlan) -> list[int]:
    """Modelled multiply-adds per text of each program of one (image, split): the H dK parts,
    then the dV part, at the padded sizes the kernel computes (K' = NC * KC tokens, d' = ND * BD
    head dims). A dK part recomputes its own head's weights and every head's (K' d' each), takes
    (G a) over every head (K'^2 each), adds its dG blocks (K'^2 each), then P and the dK product
    (K' d' each); the dV part computes each head's weights and its dV product (K' d' each)."""
    k, d, h = plan.nc * plan.kc, plan.nd * plan.bd, plan.num_heads
    dk = [(h + 3) * k * d + (h + blocks) * k * k for blocks in dg_blocks_per_head(h)]
    return dk + [2 * h * k * d]


def _arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


REGISTER_BYTES = 64 * 1024  # the forward's BT x HK' attention weights must fit in about this
TEXT_SPLITS: Optional[int] = None  # fixed number of text splits of the image-side kernel (tests)
MAX_TEXT_SPLITS = 4


def _text_splits(n_img: int, plan: KernelPlan, n_txt: int, bt: int, device: torch.device) -> int:
    """Splits of the texts for the image-side kernel, so that its (image, part, split) grid (H + 1
    parts of about equal work) fills the GPU twice over even when few images fit in a chunk;
    each split costs one partial dK, dV, dG per image (planned in ``_sizes``)."""
    if TEXT_SPLITS is not None:
        return max(1, min(TEXT_SPLITS, triton.cdiv(n_txt, bt)))
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(programs, n_img * image_side_parts(plan))
    return max(1, min(MAX_TEXT_SPLITS, want, triton.cdiv(n_txt, bt)))


def _grid(n_img: int, n_txt: int, bt: int) -> tuple[int]:
    return (n_img * triton.cdiv(n_txt, bt),)


def _check_device(x: Tensor) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"pair backend 'triton' needs CUDA tensors (got {x.device.type}); "
                           "use loss.backend=chunked on the CPU, or set TRITON_INTERPRET=1 to test it")


def _check_dtypes(*xs: Tensor) -> torch.dtype:
    dtype = xs[0].dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"pair backend 'triton' takes float32, float16 or bfloat16 inputs, got {dtype}")
    for x in xs[1:]:
        if x.dtype != dtype:
            raise TypeError(f"pair backend 'triton' needs keys, values, w_o, queries and targets in one dtype; "
                            f"got {dtype} and {x.dtype} (cast them with .to({dtype}))")
    return dtype


def _common(keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads):
    plan = make_plan(keys.shape[1], keys.shape[2], num_heads, keys.dtype)
    tensors = dict(q=queries.contiguous(), u=_text_side(targets, w_o), keys=keys.contiguous(),
                   values=values.contiguous(), scale=logit_scale.detach().reshape(1),
                   bias=logit_bias.detach().reshape(1))
    chunks = plan_chunks(keys.shape[0], queries.shape[0], plan, keys.shape[2], keys.element_size())
    return plan, chunks, tensors


def _forward(keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads, tau, offset, mode: int):
    """The forward kernel over all chunks of images. Returns (out, stats): scores [Bi, Bt] or loss
    sums per tile [Bi, Bt / MIN_BT], and [2, Bi, Bt] (cos, ||z||) for MODE_LOSS_STATS."""
    bi, k, e = keys.shape
    bt = queries.shape[0]
    plan, chunks, x = _common(keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads)
    stride = triton.cdiv(bt, pk.MIN_BT)
    f32 = dict(device=keys.device, dtype=torch.float32)
    out = torch.empty(bi, bt, **f32) if mode == pk.MODE_SCORES else torch.zeros(bi, stride, **f32)
    stats = torch.empty(2, bi, bt, **f32) if mode == pk.MODE_LOSS_STATS else None
    cfg = launch_configs(plan, keys.dtype, _arch(keys.device))["fwd"]
    for i0 in range(0, bi, chunks.images):
        i1 = min(bi, i0 + chunks.images)
        g = _gram(_fold(x["values"][i0:i1], w_o, plan), plan, keys.dtype)
        cos, nrm = (stats[0, i0:i1], stats[1, i0:i1]) if stats is not None else (out, out)
        pk._pairs_fwd_kernel[_grid(i1 - i0, bt, cfg.bt)](
            x["q"], x["u"], x["keys"][i0:i1], x["values"][i0:i1], g, x["scale"], x["bias"], out[i0:i1], cos, nrm,
            i1 - i0, bt, k, e, offset + i0, math.log2(math.e) / tau, stride, bt,
            MODE=mode, **plan.constexprs(), **cfg.options())
    return out, stats


def _on_device(x: Tensor):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class _PairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads, tau, offset,
                normalizer):
        needs_grad = any(ctx.needs_input_grad[:7])
        mode = pk.MODE_LOSS_STATS if needs_grad else pk.MODE_LOSS
        with _on_device(keys):
            partial, stats = _forward(keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads,
                                      tau, offset, mode)
        ctx.save_for_backward(keys, values, w_o, queries, targets, logit_scale, logit_bias, stats)
        ctx.args = (num_heads, tau, offset, normalizer)
        return partial.sum() / normalizer

    @staticmethod
    def backward(ctx, grad):
        keys, values, w_o, queries, targets, logit_scale, logit_bias, stats = ctx.saved_tensors
        with _on_device(keys):
            grads = _backward(keys, values, w_o, queries, targets, logit_scale, logit_bias, stats, grad, *ctx.args)
        return (*grads, None, None, None, None)


def _backward(keys, values, w_o, queries, targets, logit_scale, logit_bias, stats, grad, num_heads, tau,
              offset, normalizer):
    """Texts in chunks (outer: their fp32 accumulators exist for one chunk), images in chunks
    (inner: G, dG and the fp32 dK, dV exist for one chunk). Per pair of chunks, the image-side
    kernel writes dK, dV, dG of the chunk's images and the text-side kernel adds the chunk's
    share to dQ, dU."""
    bi, k, e = keys.shape
    bt = queries.shape[0]
    plan, chunks, x = _common(keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads)
    f32 = dict(device=keys.device, dtype=torch.float32)
    grad_scale = (grad.detach().float() / normalizer).reshape(1)
    cfg = launch_configs(plan, keys.dtype, _arch(keys.device))
    d_keys, d_values = torch.zeros_like(keys), torch.zeros_like(values)
    d_queries, d_targets = torch.empty_like(queries), torch.empty_like(targets)
    d_w = torch.zeros(e, e, **f32)
    h = plan.num_heads
    scalars = (x["scale"], x["bias"], grad_scale)
    for t0 in range(0, bt, chunks.texts):
        t1 = min(bt, t0 + chunks.texts)
        nt = t1 - t0
        dq, du = torch.zeros(nt, e, **f32), torch.zeros(nt, e, **f32)
        for i0 in range(0, bi, chunks.images):
            i1 = min(bi, i0 + chunks.images)
            ni = i1 - i0
            folded = _fold(x["values"][i0:i1], w_o, plan)
            g = _gram(folded, plan, keys.dtype)
            splits = _text_splits(ni, plan, nt, cfg["bwd_image"].bt, keys.device)
            per_split = triton.cdiv(triton.cdiv(nt, splits), cfg["bwd_image"].bt) * cfg["bwd_image"].bt
            splits = triton.cdiv(nt, per_split)
            dk, dv = torch.empty(splits, ni, k, e, **f32), torch.empty(splits, ni, k, e, **f32)
            dg = torch.zeros(splits, ni, plan.nbk, plan.nbk, **f32)
            common = (x["q"][t0:t1], x["u"][t0:t1], x["keys"][i0:i1], x["values"][i0:i1], g, *scalars,
                      stats[0, i0:i1, t0:], stats[1, i0:i1, t0:])
            sizes = (ni, nt, k, e, offset + i0 - t0, math.log2(math.e) / tau, 1.0 / tau, bt)
            pk._pairs_bwd_image_kernel[(ni, image_side_parts(plan), splits)](
                *common, dk, dv, dg, *sizes, per_split, **plan.bwd_constexprs(), **cfg["bwd_image"].options())
            pk._pairs_bwd_text_kernel[(triton.cdiv(nt, cfg["bwd_text"].bt), 2 * h)](
                *common, dq, du, *sizes, **plan.bwd_constexprs(), **cfg["bwd_text"].options())
            del g
            # The splits' partial sums, added in a fixed order.
            for part in range(1, splits):
                dk[0] += dk[part]
                dv[0] += dv[part]
                dg[0] += dg[part]
            dv_gram, dw_gram = _gram_backward(dg[0], folded, x["values"][i0:i1], w_o, plan)
            # Summed in fp32 within a text chunk, rounded to the input dtype once per text chunk.
            d_keys[i0:i1] += dk[0]
            d_values[i0:i1] += dv[0].add_(dv_gram)
            d_w += dw_gram
        d_queries[t0:t1] = dq
        d_targets[t0:t1] = du @ w_o.float()  # U = t @ W_o^T
        d_w += du.t() @ targets[t0:t1].float()
    d_scale, d_bias = _logit_grads(stats[0], logit_scale, logit_bias, grad_scale, offset, chunks.images)
    return (d_keys, d_values, d_w.to(w_o.dtype), d_queries, d_targets,
            d_scale.to(logit_scale.dtype).reshape(logit_scale.shape),
            d_bias.to(logit_bias.dtype).reshape(logit_bias.shape))


def _logit_grads(cos: Tensor, logit_scale: Tensor, logit_bias: Tensor, grad_scale: Tensor, offset: int,
                 chunk: int) -> tuple[Tensor, Tensor]:
    """dL/dlogit_scale and dL/dlogit_bias from the saved cos [Bi, Bt]: with g = dL/ds =
    (sigmoid(s) - [positive]) * grad_scale, they are sum(g * exp(scale) * cos) and sum(g).
    Images in chunks, so the only temporary is [chunk, Bt]."""
    bi, bt = cos.shape
    scale = logit_scale.detach().float().exp()
    bias = logit_bias.detach().float()
    d_scale = torch.zeros((), device=cos.device, dtype=torch.float32)
    d_bias = torch.zeros((), device=cos.device, dtype=torch.float32)
    for i0 in range(0, bi, chunk):
        c = cos[i0:i0 + chunk]
        g = torch.sigmoid(scale * c + bias)
        rows = torch.arange(c.shape[0], device=cos.device)
        cols = rows + offset + i0
        keep = (cols >= 0) & (cols < bt)
        g[rows[keep], cols[keep]] -= 1.0
        d_scale += (g * c).sum()
        d_bias += g.sum()
    return d_scale * scale * grad_scale[0], d_bias * grad_scale[0]


# -- backend functions ------------------------------------------------------------------------
def triton_loss(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                logit_scale: Tensor, logit_bias: Tensor, *, num_heads: int, tau: float, offset: int,
                normalizer: float, chunk_size: Optional[int] = None) -> Tensor:
    """Sigmoid loss of all pairs (fp32 scalar); ``targets`` unit-norm. ``chunk_size`` is unused:
    the kernel tiles the texts itself."""
    _check_device(keys)
    _check_dtypes(keys, values, w_o, queries, targets)
    return _PairLoss.apply(keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads, float(tau),
                           int(offset), float(normalizer))


def triton_scores(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                  logit_scale: Tensor, logit_bias: Tensor, *, num_heads: int, tau: float,
                  chunk_size: Optional[int] = None) -> Tensor:
    """Scores [Bi, Bt] in fp32. The kernel has no backward of its own: when a gradient is asked
    for, the scores come from the ``chunked`` backend instead."""
    _check_device(keys)
    _check_dtypes(keys, values, w_o, queries, targets)
    inputs = (keys, values, w_o, queries, targets, logit_scale, logit_bias)
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return chunked_scores(*inputs, num_heads=num_heads, tau=tau, chunk_size=chunk_size)
    with torch.no_grad(), _on_device(keys):
        out, _ = _forward(*inputs, num_heads, float(tau), 0, pk.MODE_SCORES)
    return out

