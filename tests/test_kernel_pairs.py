"""The fused Triton pair kernels against the reference backend: loss, scores and every gradient.

On the CPU these run in the Triton interpreter (fp32 and fp16; it has no bf16 dots), so sizes
are tiny; with a GPU the same tests run the compiled kernels. The reference runs in float64.
Inputs are fresh random draws each run; a failure names its seed (rerun with LLIP_TEST_SEED=...).
"""
from __future__ import annotations

import importlib
import os
import random

import pytest
import torch

from llip_scale.model import build_model, model_config
from llip_scale.pairs import available_backends, pair_loss, pair_scores

# With a GPU (or LLIP_REQUIRE_GPU_KERNELS=1) the kernels must import: an ImportError fails the
# module instead of skipping it, so a broken install cannot pass as "all skipped".
if torch.cuda.is_available() or os.environ.get("LLIP_REQUIRE_GPU_KERNELS", "0") not in ("", "0"):
    kp = importlib.import_module("llip_scale.kernels.pairs")
else:
    kp = pytest.importorskip("llip_scale.kernels.pairs", reason="needs triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["keys", "values", "w_o", "queries", "targets", "logit_scale", "logit_bias"]
TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float16: dict(rtol=2e-2, atol=6e-3)}
SEED = int(os.environ.get("LLIP_TEST_SEED", random.randrange(2**31)))


def make_inputs(bi, bt, k, e, seed):
    g = torch.Generator().manual_seed(SEED + seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return [rnd(bi, k, e), rnd(bi, k, e), rnd(e, e) / e ** 0.5, rnd(bt, e), rnd(bt, e),
            torch.tensor(1.7, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)]


def cast(inputs, dtype):
    """The five feature tensors in ``dtype`` on DEVICE, logit scale and bias in fp32 (as in the model)."""
    out = [x.to(DEVICE, dtype) for x in inputs[:5]] + [x.to(DEVICE, torch.float32) for x in inputs[5:]]
    return [x.requires_grad_() for x in out]


def loss_and_grads(inputs, **kw):
    inputs = [x.detach().requires_grad_() for x in inputs]
    loss = pair_loss(*inputs, **kw)
    return loss, torch.autograd.grad(loss, inputs)


def scalar_grad_scales(inputs, bi, offset, **kw) -> dict:
    """The size of the terms that dL/dlogit_scale and dL/dlogit_bias sum over the Bi x Bt pairs.

    Both are sums of (sigmoid(s) - y) over every pair, which nearly cancel: the result can be a
    thousandth of its terms, so it is compared on the scale of the terms, not of itself."""
    with torch.no_grad():
        s = pair_scores(*inputs, backend="reference", **kw)
        y = torch.zeros_like(s)
        rows = torch.arange(bi)
        y[rows, rows + offset] = 1.0
        g = (torch.sigmoid(s) - y).abs() / bi
        return {"logit_scale": (g * (s - inputs[6]).abs()).sum(), "logit_bias": g.sum()}


def check_against_reference(shape, dtype, seed, tau=2.5):
    bi, bt, k, e, h, off = shape
    drawn = make_inputs(bi, bt, k, e, seed)
    # The reference (float64) sees the inputs as the kernel does, rounded to ``dtype``: what is
    # compared is the kernel's arithmetic, not the rounding of its inputs.
    ref_in = [x.to(dtype).double() if i < 5 else x.float().double() for i, x in enumerate(drawn)]
    ref, ref_g = loss_and_grads(ref_in, num_heads=h, tau=tau, offset=off, backend="reference")
    got, got_g = loss_and_grads(cast(drawn, dtype), num_heads=h, tau=tau, offset=off, backend="triton")
    assert got.dtype == torch.float32
    tol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), ref, **tol, msg=lambda m: f"loss (LLIP_TEST_SEED={SEED}): {m}")
    scalar_scales = scalar_grad_scales(ref_in, bi, off, num_heads=h, tau=tau)
    for name, a, b in zip(NAMES, got_g, ref_g):
        assert a.dtype == (dtype if name not in ("logit_scale", "logit_bias") else torch.float32), name
        # Tensor gradients are compared on the scale of their largest entry.
        scale = scalar_scales.get(name, b.abs().max()).clamp_min(1e-3)
        torch.testing.assert_close(a.double().cpu() / scale, b / scale, **tol,
                                   msg=lambda m: f"grad {name} (LLIP_TEST_SEED={SEED}): {m}")


@pytest.fixture
def small_token_blocks(monkeypatch):
    """Token blocks of 16, so that K = 20 spans two blocks per head (the K > KC path)."""
    monkeypatch.setattr(kp, "MAX_KC_FP32", 16)
    monkeypatch.setattr(kp, "MAX_KC_HALF", 16)


SHAPES = {  # (Bi, Bt, K, E, H, offset)
    "ragged-offset": (3, 19, 5, 32, 2, 4),  # Bt not a multiple of the text block, offset > 0
    "k1-h1": (2, 16, 1, 16, 1, 0),
    "two-token-blocks-d20": (3, 21, 20, 40, 2, 7),  # K > KC; d = 20 is not a power of two
    "h3-last-offset": (2, 17, 3, 48, 3, 15),  # d = 16 in three heads; positives at the last columns
    # The image side's dG blocks in a round robin over head pairs: with H = 4 the pairs two heads
    # apart are ties (the lower head adds them), with H = 5 there are none; K = 20 spans two token
    # blocks per head (the blocks below the diagonal of another head's pair are added too).
    "h4-two-token-blocks": (2, 19, 20, 64, 4, 1),
    "h5-ragged": (3, 21, 5, 80, 5, 2),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_loss_and_gradients_match_reference_fp32(name, small_token_blocks):
    check_against_reference(SHAPES[name], torch.float32, seed=len(name))


@pytest.mark.parametrize("name", ["ragged-offset", "two-token-blocks-d20", "h4-two-token-blocks"])
def test_loss_and_gradients_match_reference_fp16(name, small_token_blocks):
    check_against_reference(SHAPES[name], torch.float16, seed=100 + len(name))


@pytest.mark.slow  # many tiles in the interpreter
def test_a_positive_in_every_position_of_a_tile():
    # 16 images with offset 5 put positives at columns 5..20: every row of a 16-text tile holds
    # one, in both tiles they touch; a label bug at any position changes the loss and gradients.
    check_against_reference((16, 37, 2, 16, 1, 5), torch.float32, seed=7, tau=1.0)


def test_all_tokens_k_matches_reference():
    # The "all tokens" variant mixes K + patches tokens: 32 + 256 = 288 for a 224 px ViT-*/14
    # with K = 32, beyond one token block (the fp32 interpreter plan: 5 blocks of 64). On a GPU
    # in fp16 (3 blocks of 128): compiled, the fp32 kernels at this K spill tens of KB per
    # thread and take minutes to compile (benchmarks/RESULTS.md), which the tensor-core path does not.
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    check_against_reference((2, 16, 288, 32, 2, 1), dtype, seed=13)


def test_chunked_launches_match_one_launch(monkeypatch):
    # Several image chunks (G, dG per chunk) and text chunks (fp32 accumulators per chunk).
    monkeypatch.setattr(kp, "IMAGE_CHUNK", 2)
    monkeypatch.setattr(kp, "TEXT_CHUNK", 16)
    check_against_reference((5, 40, 3, 32, 2, 9), torch.float32, seed=11)


def test_text_splits_of_the_image_side_match_reference(monkeypatch):
    # The image-side kernel split over the texts (one partial dK, dV, dG per split, summed in
    # order), with a last split shorter than the others.
    monkeypatch.setattr(kp, "TEXT_SPLITS", 3)
    check_against_reference((3, 37, 5, 32, 2, 2), torch.float32, seed=17)


def test_gradients_are_bitwise_repeatable(monkeypatch, small_token_blocks):
    # No atomics: every gradient is summed in a fixed order, so two runs on the same inputs give
    # the same bits, through image chunks, text chunks and text splits.
    monkeypatch.setattr(kp, "IMAGE_CHUNK", 2)
    monkeypatch.setattr(kp, "TEXT_CHUNK", 32)
    monkeypatch.setattr(kp, "TEXT_SPLITS", 2)
    bi, bt, k, e, h = 3, 45, 20, 40, 2
    for dtype in (torch.float32, torch.float16):
        x = cast(make_inputs(bi, bt, k, e, seed=23), dtype)
        runs = [loss_and_grads(x, num_heads=h, tau=2.5, offset=4, backend="triton") for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0])
        for name, a, b in zip(NAMES, runs[0][1], runs[1][1]):
            assert torch.equal(a, b), f"{dtype} grad {name} differs between two runs"


ZOO_HEADS = ((8, 128, 4), (32, 512, 8), (32, 768, 8), (64, 1024, 8), (64, 1280, 8))  # tiny, B, L/14, H/14, G/14


def test_launch_configs_are_fixed_per_shape_dtype_and_arch():
    """One config per kernel (no autotuning): what tools/kernel_resources.py --chosen compiles,
    for every dtype; fp32 (FMA dots, no tensor cores) has its own, smaller text blocks."""
    for k, e, h in ZOO_HEADS:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            plan = kp.make_plan(k, e, h, dtype)
            for arch in (80, 90):
                configs = kp.launch_configs(plan, dtype, arch, interpret=False)
                assert set(configs) == set(kp.KERNELS)
                assert all(c.bt in (16, 32, 64) and c.num_warps in (4, 8) for c in configs.values())
                assert configs == kp.launch_configs(plan, kp.DTYPES[dtype], arch, interpret=False)
                if dtype == torch.float32:
                    assert all(c.bt == 16 for c in configs.values()), configs
            half = [kp.launch_configs(kp.make_plan(k, e, h, d), d, 90, interpret=False)
                    for d in (torch.bfloat16, torch.float16)]
            assert half[0] == half[1]  # the same tensor-core tiles for both 2-byte types
    with pytest.raises(TypeError, match="no launch configs"):
        kp.launch_configs(kp.make_plan(8, 128, 4, torch.float32), torch.float64, 90, interpret=False)


def test_fp32_token_blocks_keep_the_forward_gram_pass_small():
    """fp32 takes the smallest token block that keeps H x K / KC <= MAX_NB_FP32 (the forward
    unrolls NB^2 / 2 Gram block products), so its FMA dot operands stay small."""
    for (k, e, h), kc in zip(ZOO_HEADS + ((288, 32, 2),), (16, 16, 16, 32, 32, 64)):
        plan = kp.make_plan(k, e, h, torch.float32)
        assert plan.kc == kc and plan.nb <= kp.MAX_NB_FP32 or plan.kc == kp.MAX_KC_FP32, (k, e, h, plan)
    assert kp.make_plan(64, 1280, 8, torch.bfloat16).kc == 64  # 2-byte types: unchanged


def test_image_side_programs_do_about_the_same_work():
    """The modelled work per text of the image side's H + 1 programs per (image, split): every
    head pair's dG block is added once, and no program does more than 1.1x the least at the
    B/16 to G/14 heads (1.35x at the tiny head, whose K = 8 is padded to a block of 16: the dK
    parts' K'^2 terms weigh more there). Before, the dK parts did about 7x the dV parts' work."""
    for h in range(1, 10):
        blocks = kp.dg_blocks_per_head(h)
        assert sum(blocks) == h * (h + 1) // 2 and max(blocks) - min(blocks) <= 1, (h, blocks)
    for k, e, h in ZOO_HEADS:
        for dtype in (torch.bfloat16, torch.float32):
            plan = kp.make_plan(k, e, h, dtype)
            macs = kp.image_side_macs(plan)
            assert len(macs) == kp.image_side_parts(plan) == h + 1
            assert max(macs) <= (1.35 if k == 8 else 1.1) * min(macs), ((k, e, h), dtype, macs)


def test_scores_match_reference_and_loss_without_grad():
    bi, bt, k, e, h = 3, 18, 4, 32, 2
    ref_in = make_inputs(bi, bt, k, e, seed=3)
    x = [t.detach() for t in cast(ref_in, torch.float32)]
    ref = pair_scores(*ref_in, num_heads=h, tau=5.0, backend="reference")
    with torch.no_grad():
        got = pair_scores(*x, num_heads=h, tau=5.0, backend="triton")
        loss = pair_loss(*x, num_heads=h, tau=5.0, offset=6, backend="triton")
    assert got.shape == (bi, bt) and got.dtype == torch.float32
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    expected = pair_loss(*ref_in, num_heads=h, tau=5.0, offset=6, backend="reference")
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)


def test_scores_with_gradients_come_from_the_differentiable_path():
    ref_in = make_inputs(2, 5, 3, 16, seed=5)
    x = cast(ref_in, torch.float32)
    got = pair_scores(*x, num_heads=2, tau=5.0, backend="triton")
    got.sum().backward()
    assert x[0].grad is not None and torch.isfinite(x[0].grad).all()
    ref = pair_scores(*ref_in, num_heads=2, tau=5.0, backend="reference")
    torch.testing.assert_close(got.detach().double().cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a model step in the interpreter
def test_tiny_model_training_step_matches_chunked():
    """The real entry point: ContrastiveModel with backend=triton, loss and every parameter gradient."""
    torch.manual_seed(0)
    cfg = model_config("tiny")
    models = {b: build_model(cfg, backend=b).to(DEVICE) for b in ("triton", "chunked")}
    models["chunked"].load_state_dict(models["triton"].state_dict())
    images = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, device=DEVICE)
    tokens = torch.randint(3, cfg.text.vocab_size, (4, cfg.text.context_length), device=DEVICE)
    tokens[:, 9] = cfg.text.eot_id
    losses = {b: m(images, tokens) for b, m in models.items()}
    for loss in losses.values():
        loss.backward()
    torch.testing.assert_close(losses["triton"], losses["chunked"], rtol=1e-5, atol=1e-5)
    grads = {b: dict((n, p.grad) for n, p in m.named_parameters() if p.grad is not None) for b, m in models.items()}
    assert grads["triton"].keys() == grads["chunked"].keys()
    for name, g in grads["chunked"].items():
        scale = g.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads["triton"][name] / scale, g / scale, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_backend_is_registered():
    assert "triton" in available_backends()


def test_bad_inputs_give_one_clear_line(monkeypatch):
    x = [t.detach() for t in cast(make_inputs(2, 4, 2, 16, seed=1), torch.float32)]
    mixed = [x[0], x[1].half(), *x[2:]]
    with pytest.raises(TypeError, match=r"one dtype; got torch.float32 and torch.float16"):
        pair_loss(*mixed, num_heads=2, tau=5.0, backend="triton")
    doubles = [t.double() for t in x]
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        pair_loss(*doubles, num_heads=2, tau=5.0, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = [t.cpu() for t in x]
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*loss.backend=chunked"):
        pair_loss(*cpu, num_heads=2, tau=5.0, backend="triton")


def test_head_dims_that_are_not_powers_of_two_step_without_padding():
    for e, h, step in ((1280, 8, 32), (768, 8, 32), (1024, 8, 64), (512, 8, 64), (128, 4, 32)):
        plan = kp.make_plan(64, e, h, torch.bfloat16)
        assert plan.bd == step and plan.even_d, (e, h)
    plan = kp.make_plan(1, 24, 2, torch.float32)  # d = 12: one masked step of 16
    assert plan.bd == 16 and not plan.even_d and plan.kc == 16 and plan.nc == 1
    plan = kp.make_plan(256, 1280, 8, torch.bfloat16)  # K = 256: two blocks of 128 per head
    assert (plan.kc, plan.nc, plan.nbk) == (128, 2, 2048)


@pytest.mark.parametrize("model,global_batch", [("g14", 32768), ("h14", 32768), ("b16", 32768), ("l14", 32768)])
def test_extra_memory_stays_within_twice_the_inputs(model, global_batch):
    """The chunk plan at the reference recipe's shapes (256 local images): nothing grows with
    Bi x Bt x K or Bi x Bt x E, and the backward's extra memory is at most 2x its inputs."""
    head = model_config(model).head
    k = model_config(model).vision.num_tokens
    bi, bt, e = 256, global_batch, head.embed_dim
    inputs = (2 * bi * k * e + 2 * bt * e + e * e) * 2
    extra = kp.workspace_bytes(bi, bt, k, e, head.num_heads, torch.bfloat16)
    assert extra <= 2 * inputs, f"{extra / 2**20:.0f} MiB extra for {inputs / 2**20:.0f} MiB of inputs"
    naive = bi * bt * head.num_heads * k * 2  # the attention weights alone, materialised
    assert extra < naive / 10
