"""The ``triton`` pair backend: fused kernels behind a ``torch.autograd.Function``.

Importing this module registers the backend with ``llip_scale.pairs``. Data flow of one call:

    forward:  U = t @ W_o^T [Bt, E]  (once)
              for each chunk of images:  V' = values folded with W_o,  G = V' V'^T [c, HK', HK']
                  fused kernel over (image, text block) tiles -> loss sum per tile
                  (+ cos, ||z|| per pair [2, Bi, Bt] fp32 when a gradient is needed)
    backward: recompute U; for each chunk of texts, for each chunk of images: recompute V', G;
              fused kernel -> fp32 atomics into dQ, dU [c_t, E], dK, dV [c_i, K, E],
              dG [c_i, HK', HK'] (+ dlogit_scale/bias per tile); then in PyTorch (fp32)
              dG -> dV, dW_o per image chunk and dU -> dt, dW_o per text chunk.

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

__all__ = ["triton_loss", "triton_scores", "KernelPlan", "make_plan", "Chunks", "plan_chunks", "workspace_bytes",
           "interpreting"]

GROUP = 8  # images per band of the program order (L2 reuse of G and the text blocks)
# Largest token block: a G block of KC x KC stays a small dot operand (fp32 takes twice the room).
MAX_KC_HALF = 128
MAX_KC_FP32 = 64


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

    def constexprs(self) -> dict:
        return dict(H=self.num_heads, NC=self.nc, NB=self.nb, NBK=self.nbk, D=self.head_dim, BD=self.bd,
                    KC=self.kc, EVEN_D=self.even_d, PREC=self.prec, GROUP=GROUP)


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
               + 3 * bi * triton.cdiv(bt, pk.MIN_BT) * 4  # loss, dlogit_scale, dlogit_bias per tile
               + e * e * 4),  # fp32 dW_o
        # G (input dtype and fp32), dG and its symmetrisation (fp32), V' and one head of dV' (fp32),
        # fp32 dK, dV, values and dvalues of the chunk
        per_image=nbk * nbk * (elt + 12) + (nbk + plan.nc * plan.kc) * e * 4 + 4 * k * e * 4,
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
# (BT, num_warps, num_stages) tried by the autotuner. Chosen from the register and spill counts of
# tools/kernel_resources.py for sm_90; the first entry is the fixed choice without autotuning.
FWD_CONFIGS = ((64, 8, 2), (16, 8, 2), (32, 8, 2), (16, 4, 2))
BWD_CONFIGS = ((16, 8, 2), (64, 8, 2), (32, 8, 2))
REGISTER_BYTES = 64 * 1024  # the BT x HK' attention weights of a program must fit in about this


def _fits(bt: int, nbk: int, elt: int) -> bool:
    return bt * nbk * elt <= REGISTER_BYTES


def _prune(configs, named_args, **kwargs):
    nbk, elt = kwargs["NBK"], named_args["Q"].element_size()
    fit = [c for c in configs if _fits(c.kwargs["BT"], nbk, elt)]
    return fit or [min(configs, key=lambda c: c.kwargs["BT"])]


def autotuning() -> bool:
    """Autotune on the GPU unless LLIP_PAIRS_AUTOTUNE=0 (then the first fitting config is used)."""
    return os.environ.get("LLIP_PAIRS_AUTOTUNE", "1") != "0"


_TUNED: dict[str, object] = {}


def _launcher(name: str, nbk: int, elt: int):
    """(kernel, launch options): autotuned over BT and warps on a GPU, a fixed config otherwise;
    BT = 16 in the interpreter, where every program costs milliseconds."""
    kernel = pk._pairs_fwd_kernel if name == "fwd" else pk._pairs_bwd_kernel
    table = FWD_CONFIGS if name == "fwd" else BWD_CONFIGS
    if interpreting():
        return kernel, {"BT": pk.MIN_BT}
    if not autotuning():
        bt, warps, stages = next((c for c in table if _fits(c[0], nbk, elt)), min(table))
        return kernel, dict(BT=bt, num_warps=warps, num_stages=stages)
    if name not in _TUNED:
        extra = {}
        if name == "bwd":  # atomics: benchmark runs must not leave their sums behind
            extra = dict(reset_to_zero=["dG", "dSB"], restore_value=["dQ", "dU", "dK", "dV"])
        configs = [triton.Config({"BT": bt}, num_warps=w, num_stages=st) for bt, w, st in table]
        _TUNED[name] = triton.autotune(configs, key=["n_txt", "n_tok", "E", "NBK", "D"], cache_results=True,
                                       prune_configs_by={"early_config_prune": _prune}, **extra)(kernel)
    return _TUNED[name], {}


def _grid(n_img: int, n_txt: int):
    return lambda meta: (n_img * triton.cdiv(n_txt, meta["BT"]),)


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
    kernel, fixed = _launcher("fwd", plan.nbk, keys.element_size())
    for i0 in range(0, bi, chunks.images):
        i1 = min(bi, i0 + chunks.images)
        g = _gram(_fold(x["values"][i0:i1], w_o, plan), plan, keys.dtype)
        cos, nrm = (stats[0, i0:i1], stats[1, i0:i1]) if stats is not None else (out, out)
        kernel[_grid(i1 - i0, bt)](
            x["q"], x["u"], x["keys"][i0:i1], x["values"][i0:i1], g, x["scale"], x["bias"], out[i0:i1], cos, nrm,
            i1 - i0, bt, k, e, offset + i0, math.log2(math.e) / tau, stride, bt,
            MODE=mode, **plan.constexprs(), **fixed)
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
    (inner: G, dG and the fp32 dK, dV exist for one chunk)."""
    bi, k, e = keys.shape
    bt = queries.shape[0]
    plan, chunks, x = _common(keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads)
    stride = triton.cdiv(bt, pk.MIN_BT)
    f32 = dict(device=keys.device, dtype=torch.float32)
    grad_scale = (grad.detach().float() / normalizer).reshape(1)
    dsb = torch.zeros(bi, stride, 2, **f32)
    d_keys, d_values = torch.zeros_like(keys), torch.zeros_like(values)
    d_queries, d_targets = torch.empty_like(queries), torch.empty_like(targets)
    d_w = torch.zeros(e, e, **f32)
    kernel, fixed = _launcher("bwd", plan.nbk, keys.element_size())
    for t0 in range(0, bt, chunks.texts):
        t1 = min(bt, t0 + chunks.texts)
        dq, du = torch.zeros(t1 - t0, e, **f32), torch.zeros(t1 - t0, e, **f32)
        for i0 in range(0, bi, chunks.images):
            i1 = min(bi, i0 + chunks.images)
            folded = _fold(x["values"][i0:i1], w_o, plan)
            g = _gram(folded, plan, keys.dtype)
            dg = torch.zeros(i1 - i0, plan.nbk, plan.nbk, **f32)
            dk, dv = torch.zeros(i1 - i0, k, e, **f32), torch.zeros(i1 - i0, k, e, **f32)
            kernel[_grid(i1 - i0, t1 - t0)](
                x["q"][t0:t1], x["u"][t0:t1], x["keys"][i0:i1], x["values"][i0:i1], g, x["scale"], x["bias"],
                grad_scale, stats[0, i0:i1, t0:], stats[1, i0:i1, t0:],
                dq, du, dk, dv, dg, dsb[i0:i1, t0 // pk.MIN_BT:],
                i1 - i0, t1 - t0, k, e, offset + i0 - t0, math.log2(math.e) / tau, 1.0 / tau, stride, bt,
                **plan.constexprs(), **fixed)
            del g
            dv_gram, dw_gram = _gram_backward(dg, folded, x["values"][i0:i1], w_o, plan)
            # Summed in fp32 within a text chunk, rounded to the input dtype once per text chunk.
            d_keys[i0:i1] += dk
            d_values[i0:i1] += dv.add_(dv_gram)
            d_w += dw_gram
        d_queries[t0:t1] = dq
        d_targets[t0:t1] = du @ w_o.float()  # U = t @ W_o^T
        d_w += du.t() @ targets[t0:t1].float()
    sums = dsb.sum(dim=(0, 1))
    return (d_keys, d_values, d_w.to(w_o.dtype), d_queries, d_targets,
            sums[0].to(logit_scale.dtype).reshape(logit_scale.shape),
            sums[1].to(logit_bias.dtype).reshape(logit_bias.shape))


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

