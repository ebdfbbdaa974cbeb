"""The ``triton`` pair backend: fused kernels behind a ``torch.autograd.Function``.

Importing this module registers the backend with ``llip_scale.pairs``. Data flow of one call:

    forward:  U = t @ W_o^T [Bt, E]  (once)
              for each chunk of images:  V' = values folded with W_o,  G = V' V'^T [c, HK', HK']
                  fused kernel over (image, text block) tiles -> loss sum per tile
                  (+ cos, ||z|| per pair [2, Bi, Bt] fp32 when a gradient is needed)
    backward: recompute U; per chunk of images recompute V', G; fused kernel -> fp32 atomics into
              dQ, dU [Bt, E], dK, dV [c, K, E], dG [c, HK', HK'] (+ dlogit_scale/bias per tile);
              dG -> dV, dW_o and dU -> dt, dW_o in PyTorch (fp32).

Nothing of size Bi x Bt x K or Bi x Bt x E is ever allocated; G and the fp32 image-side
accumulators exist for one chunk of images at a time, sized from the inputs (``image_chunk``).
HK' = H * K rounded up to the token block KC per head (zero rows and columns of G).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (correctness only: the
interpreter costs milliseconds per program; ``chunked`` is the CPU path).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from llip_scale.kernels import pair_kernels as pk
from llip_scale.pairs import register_backend
from llip_scale.pairs.chunked import chunked_scores

__all__ = ["triton_loss", "triton_scores", "KernelPlan", "make_plan", "image_chunk", "workspace_bytes",
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


def image_chunk(bi: int, bt: int, plan: KernelPlan, embed_dim: int, elt: int) -> int:
    """Images per launch: the per-chunk tensors (G, V', dV', fp32 dG, dK, dV) stay within a
    quarter of the size of the inputs (at least 32 MiB), so they never dominate memory."""
    inputs = (2 * bi * plan.tokens * embed_dim + 2 * bt * embed_dim + embed_dim ** 2) * elt
    per_image = (plan.nbk ** 2 * (elt + 4 + 4)  # G in the input dtype, fp32 G and dG
                 + 2 * plan.nbk * embed_dim * 4  # V' and dV' (fp32)
                 + 2 * plan.tokens * embed_dim * 4)  # dK, dV accumulators
    return max(1, min(bi, max(inputs // 4, 32 << 20) // per_image))


def workspace_bytes(bi: int, bt: int, num_tokens: int, embed_dim: int, num_heads: int,
                    dtype: torch.dtype, backward: bool = True) -> int:
    """Bytes the backend allocates beyond its inputs and outputs (peak, by construction)."""
    elt = torch.empty((), dtype=dtype).element_size()
    plan = make_plan(num_tokens, embed_dim, num_heads, dtype)
    ic = image_chunk(bi, bt, plan, embed_dim, elt)
    u = bt * embed_dim * elt
    stats = 2 * bi * bt * 4 if backward else 0
    partial = bi * triton.cdiv(bt, pk.MIN_BT) * 4 * (3 if backward else 1)
    chunk = ic * (plan.nbk ** 2 * (elt + 8) + 2 * plan.nbk * embed_dim * 4 + 2 * num_tokens * embed_dim * 4)
    text_acc = 2 * bt * embed_dim * 4 if backward else 0  # fp32 dQ, dU
    return u + stats + partial + chunk + text_acc + embed_dim ** 2 * 4


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
    """Given d(loss)/dG (any D' with D' + D'^T = 2 dG), the gradients of values [c, K, E] and W_o."""
    c, k, e = values.shape
    h, d = plan.num_heads, plan.head_dim
    dsym = dg + dg.transpose(1, 2)
    d_folded = torch.bmm(dsym, folded.reshape(c, plan.nbk, e)).reshape(c, h, -1, e)[:, :, :k]  # [c, H, K, E]
    w3 = w_o.float().reshape(h, d, e)
    d_values = torch.einsum("ihke,hde->ikhd", d_folded, w3).reshape(c, k, e)
    d_w = torch.einsum("ikhd,ihke->hde", values.float().reshape(c, k, h, d), d_folded).reshape(e, e)
    return d_values, d_w


def _text_side(targets: Tensor, w_o: Tensor) -> Tensor:
    """U = t @ W_o^T, so that <mixed @ W_o, t> = <mixed, U>."""
    return (targets.float() @ w_o.float().t()).to(targets.dtype).contiguous()


# -- launches -------------------------------------------------------------------------------
def _configs() -> list:
    # BT x HK' attention weights live in registers: the prune keeps them to about 64 KB per program.
    return [triton.Config({"BT": bt}, num_warps=w, num_stages=s)
            for bt, w, s in ((64, 8, 2), (64, 4, 2), (32, 4, 2), (16, 4, 1))]


def _prune(configs, named_args, **kwargs):
    elt = named_args["Q"].element_size()
    nbk = kwargs.get("NBK", named_args.get("NBK"))
    fit = [c for c in configs if c.kwargs["BT"] * nbk * elt <= 64 * 1024]
    return fit or [min(configs, key=lambda c: c.kwargs["BT"])]


_TUNED: dict[str, object] = {}


def _launcher(name: str):
    """The kernel to launch: autotuned over BT and warps on a GPU, fixed BT=16 in the interpreter."""
    kernel = pk._pairs_fwd_kernel if name == "fwd" else pk._pairs_bwd_kernel
    if interpreting():
        return kernel, {"BT": pk.MIN_BT}
    if name not in _TUNED:
        extra = {}
        if name == "bwd":  # atomics: benchmark runs must not leave their sums behind
            extra = dict(reset_to_zero=["dK", "dV", "dG"], restore_value=["dQ", "dU"])
        _TUNED[name] = triton.autotune(_configs(), key=["n_txt", "n_tok", "E"],
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


def _forward(keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads, tau, offset,
             mode: int):
    """Runs the forward kernel over all image chunks. Returns (out, cos, norm)."""
    bi, k, e = keys.shape
    bt = queries.shape[0]
    dtype = keys.dtype
    plan = make_plan(k, e, num_heads, dtype)
    u = _text_side(targets, w_o)
    q = queries.contiguous()
    keys, values = keys.contiguous(), values.contiguous()
    scale, bias = logit_scale.detach().reshape(1), logit_bias.detach().reshape(1)
    stride = triton.cdiv(bt, pk.MIN_BT)
    if mode == pk.MODE_SCORES:
        out = torch.empty(bi, bt, device=keys.device, dtype=torch.float32)
    else:
        out = torch.zeros(bi, stride, device=keys.device, dtype=torch.float32)
    stats = torch.empty(2, bi, bt, device=keys.device, dtype=torch.float32) if mode == pk.MODE_LOSS_STATS else None
    kernel, fixed = _launcher("fwd")
    ic = image_chunk(bi, bt, plan, e, keys.element_size())
    for i0 in range(0, bi, ic):
        i1 = min(bi, i0 + ic)
        g = _gram(_fold(values[i0:i1], w_o, plan), plan, dtype)
        cos = stats[0, i0:i1] if stats is not None else out
        nrm = stats[1, i0:i1] if stats is not None else out
        kernel[_grid(i1 - i0, bt)](
            q, u, keys[i0:i1], values[i0:i1], g, scale, bias, out[i0:i1], cos, nrm,
            i1 - i0, bt, k, e, offset + i0, math.log2(math.e) / tau, stride,
            MODE=mode, **plan.constexprs(), **fixed)
    return out, stats


class _PairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads, tau, offset,
                normalizer):
        needs_grad = any(ctx.needs_input_grad[:7])
        mode = pk.MODE_LOSS_STATS if needs_grad else pk.MODE_LOSS
        partial, stats = _forward(keys, values, w_o, queries, targets, logit_scale, logit_bias, num_heads, tau,
                                  offset, mode)
        ctx.save_for_backward(keys, values, w_o, queries, targets, logit_scale, logit_bias, stats)
        ctx.args = (num_heads, tau, offset, normalizer)
        return partial.sum() / normalizer

    @staticmethod
    def backward(ctx, grad):
        keys, values, w_o, queries, targets, logit_scale, logit_bias, stats = ctx.saved_tensors
        num_heads, tau, offset, normalizer = ctx.args
        grads = _backward(keys, values, w_o, queries, targets, logit_scale, logit_bias, stats, grad,
                          num_heads, tau, offset, normalizer)
        return (*grads, None, None, None, None)


def _backward(keys, values, w_o, queries, targets, logit_scale, logit_bias, stats, grad, num_heads, tau,
              offset, normalizer):
    bi, k, e = keys.shape
    bt = queries.shape[0]
    dtype, dev = keys.dtype, keys.device
    plan = make_plan(k, e, num_heads, dtype)
    u = _text_side(targets, w_o)
    q = queries.contiguous()
    keys, values = keys.contiguous(), values.contiguous()
    scale, bias = logit_scale.detach().reshape(1), logit_bias.detach().reshape(1)
    grad_scale = (grad.detach().float() / normalizer).reshape(1)
    stride = triton.cdiv(bt, pk.MIN_BT)
    f32 = dict(device=dev, dtype=torch.float32)
    dq, du = torch.zeros(bt, e, **f32), torch.zeros(bt, e, **f32)
    dsb = torch.zeros(bi, stride, 2, **f32)
    d_keys, d_values = torch.empty_like(keys), torch.empty_like(values)
    d_w = torch.zeros(e, e, **f32)
    kernel, fixed = _launcher("bwd")
    ic = image_chunk(bi, bt, plan, e, keys.element_size())
    for i0 in range(0, bi, ic):
        i1 = min(bi, i0 + ic)
        folded = _fold(values[i0:i1], w_o, plan)
        g = _gram(folded, plan, dtype)
        dk, dv = torch.zeros(i1 - i0, k, e, **f32), torch.zeros(i1 - i0, k, e, **f32)
        dg = torch.zeros(i1 - i0, plan.nbk, plan.nbk, **f32)
        kernel[_grid(i1 - i0, bt)](
            q, u, keys[i0:i1], values[i0:i1], g, scale, bias, grad_scale, stats[0, i0:i1], stats[1, i0:i1],
            dq, du, dk, dv, dg, dsb[i0:i1],
            i1 - i0, bt, k, e, offset + i0, math.log2(math.e) / tau, 1.0 / tau, stride,
            **plan.constexprs(), **fixed)
        del g
        dv_gram, dw_gram = _gram_backward(dg, folded, values[i0:i1], w_o, plan)
        d_keys[i0:i1] = dk
        d_values[i0:i1] = dv + dv_gram
        d_w += dw_gram
    d_targets = du @ w_o.float()  # U = t @ W_o^T
    d_w += du.t() @ targets.float()
    sums = dsb.sum(dim=(0, 1))
    return (d_keys, d_values, d_w.to(w_o.dtype), dq.to(queries.dtype), d_targets.to(targets.dtype),
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
    with torch.no_grad():
        out, _ = _forward(*inputs, num_heads, float(tau), 0, pk.MODE_SCORES)
    return out


register_backend("triton", triton_loss, triton_scores)
