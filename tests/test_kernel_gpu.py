"""The Triton pair backend on a GPU: bf16 at the model zoo's head shapes, memory, dispatch.

Skipped without CUDA (the interpreter tests in test_kernel_pairs.py cover fp32 and fp16 on the CPU).
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from llip_scale.pairs import pair_loss, resolve_backend

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# With a GPU (or LLIP_REQUIRE_GPU_KERNELS=1) the kernels must import: an ImportError fails the
# module instead of skipping it, so a broken install cannot pass as "all skipped".
if torch.cuda.is_available() or os.environ.get("LLIP_REQUIRE_GPU_KERNELS", "0") not in ("", "0"):
    kp = importlib.import_module("llip_scale.kernels.pairs")
else:
    kp = pytest.importorskip("llip_scale.kernels.pairs", reason="needs triton")
NAMES = ["keys", "values", "w_o", "queries", "targets", "logit_scale", "logit_bias"]


def make_inputs(bi, bt, k, e, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float64)  # noqa: E731
    feats = [rnd(bi, k, e), rnd(bi, k, e), rnd(e, e) / e ** 0.5, rnd(bt, e), rnd(bt, e)]
    scalars = [torch.tensor(2.3, device="cuda"), torch.tensor(-10.0, device="cuda")]
    ref = [x.clone().requires_grad_() for x in feats + [s.double() for s in scalars]]
    low = [x.to(dtype).requires_grad_() for x in feats] + [s.clone().requires_grad_() for s in scalars]
    return ref, low


def grads(inputs, **kw):
    loss = pair_loss(*inputs, **kw)
    return loss, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype,shape", [
    (torch.bfloat16, (6, 150, 64, 1280, 8)),  # G/14's head: d = 160 in steps of 32
    (torch.bfloat16, (5, 90, 32, 768, 8)),  # L/14's head: d = 96
    (torch.float16, (4, 70, 32, 512, 8)),
    (torch.float32, (4, 70, 32, 512, 8)),
])
def test_matches_float64_reference(dtype, shape):
    bi, bt, k, e, h = shape
    ref_in, low_in = make_inputs(bi, bt, k, e, dtype)
    kw = dict(num_heads=h, tau=5.0, offset=bt - bi)
    ref, ref_g = grads(ref_in, backend="reference", **kw)
    got, got_g = grads(low_in, backend="triton", **kw)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-2)
    torch.testing.assert_close(got.double(), ref, **tol)
    for name, a, b in zip(NAMES, got_g, ref_g):
        scale = b.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(a.double() / scale, b / scale, **tol, msg=lambda m: f"grad {name}: {m}")


def test_gradients_are_bitwise_repeatable():
    """G/14's head in bf16, with few images per launch so that the image-side kernel splits the
    texts: no atomics, so two backward passes give identical bits."""
    bi, bt, k, e, h = 16, 2000, 64, 1280, 8
    _, x = make_inputs(bi, bt, k, e, torch.bfloat16, seed=1)
    with torch.no_grad():
        x[4] = F.normalize(x[4], dim=-1).requires_grad_()
    runs = [grads(x, backend="triton", num_heads=h, tau=5.0, offset=0) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name, a, b in zip(NAMES, runs[0][1], runs[1][1]):
        assert torch.equal(a, b), f"grad {name} differs between two runs"


def test_extra_memory_is_within_twice_the_inputs():
    """Forward+backward at G/14's head shape: allocations beyond inputs and gradients."""
    bi, bt, k, e, h = 64, 16384, 64, 1280, 8
    _, x = make_inputs(bi, bt, k, e, torch.bfloat16)
    with torch.no_grad():  # the backend gets unit-norm targets from the dispatcher
        x[4] = F.normalize(x[4], dim=-1).requires_grad_()
    inputs = sum(t.numel() * t.element_size() for t in x)

    def step():
        kp.triton_loss(*x, num_heads=h, tau=5.0, offset=0, normalizer=float(bi)).backward()

    step()  # compile and cuBLAS workspaces are not the backend's memory
    for t in x:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - inputs  # the gradients are the size of the inputs
    assert extra <= 2 * inputs, f"{extra / 2**20:.0f} MiB beyond inputs and gradients ({inputs / 2**20:.0f} MiB)"
    planned = kp.workspace_bytes(bi, bt, k, e, h, torch.bfloat16)
    assert extra <= 1.1 * planned + (16 << 20), f"{extra / 2**20:.0f} MiB measured, {planned / 2**20:.0f} MiB planned"


def test_auto_picks_triton_on_cuda():
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"
