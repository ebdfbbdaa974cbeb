"""The pair computation: every backend against the reference, loss and every gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llip_scale.pairs import chunked, pair_loss, pair_scores, sigmoid_loss
from llip_scale.pairs.chunked import chunked_loss, gram_blocks


def make_inputs(bi, bt, k, e, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return [rnd(bi, k, e), rnd(bi, k, e), rnd(e, e) / e ** 0.5, rnd(bt, e), rnd(bt, e),
            torch.tensor(1.7, dtype=dtype, requires_grad=True), torch.tensor(-3.0, dtype=dtype, requires_grad=True)]


def loss_and_grads(inputs, **kw):
    loss = pair_loss(*inputs, **kw)
    return loss, torch.autograd.grad(loss, inputs)


NAMES = ["keys", "values", "w_o", "queries", "targets", "logit_scale", "logit_bias"]
SHAPES = [  # (Bi, Bt, K, E, H, offset)
    (5, 13, 3, 8, 2, 4),  # Bt not a multiple of the chunk, nonzero offset
    (4, 4, 1, 6, 1, 0),  # K = 1, H = 1
    (3, 11, 40, 16, 2, 8),  # H*K > E: the "plain" path; offset at the last possible column
    (6, 6, 7, 12, 3, 0),
    (3, 9, 288, 32, 4, 2),  # K = 32 + 256: the "all tokens" variant of a 224 px ViT-*/14 with K = 32
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [None, 1, 4])
@pytest.mark.parametrize("mode", [None, "gram", "plain"])
def test_chunked_matches_reference_float64(shape, chunk, mode):
    bi, bt, k, e, h, off = shape
    inputs = make_inputs(bi, bt, k, e)
    ref, ref_g = loss_and_grads(inputs, num_heads=h, tau=2.5, offset=off, backend="reference")
    # Call the backend directly to force the mode; targets normalised as the dispatcher does.
    direct = inputs[:4] + [F.normalize(inputs[4], dim=-1)] + inputs[5:]
    got = chunked_loss(*direct, num_heads=h, tau=2.5, offset=off, normalizer=float(bi), chunk_size=chunk, mode=mode)
    got_g = torch.autograd.grad(got, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(NAMES, got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_chunked_matches_reference_float32(shape):
    bi, bt, k, e, h, off = shape
    inputs = make_inputs(bi, bt, k, e, dtype=torch.float32)
    ref, ref_g = loss_and_grads(inputs, num_heads=h, tau=5.0, offset=off, backend="reference")
    got, got_g = loss_and_grads(inputs, num_heads=h, tau=5.0, offset=off, backend="chunked", chunk_size=3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture
def small_blocks(monkeypatch):
    """Gram blocks of a few pairs, so that tests cover many image blocks x text blocks."""
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 64)


@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:4])
@pytest.mark.parametrize("chunk", [None, 2, 5])
def test_fused_gram_blocks_match_reference_float64(shape, chunk, monkeypatch):
    bi, bt, k, e, h, off = shape
    texts = gram_blocks(bi, bt, k, h, chunk)[1]
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 2 * texts * h * k)  # blocks of two images
    assert gram_blocks(bi, bt, k, h, chunk)[0] == 2
    inputs = make_inputs(bi, bt, k, e)
    ref, ref_g = loss_and_grads(inputs, num_heads=h, tau=2.5, offset=off, backend="reference")
    got, got_g = loss_and_grads(inputs, num_heads=h, tau=2.5, offset=off, backend="chunked", chunk_size=chunk)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(NAMES, got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name}: {m}")
    with torch.no_grad():
        ref_s = pair_scores(*inputs, num_heads=h, tau=2.5, backend="reference")
        got_s = pair_scores(*inputs, num_heads=h, tau=2.5, backend="chunked", chunk_size=chunk)
    torch.testing.assert_close(got_s, ref_s, rtol=1e-10, atol=1e-12)


def test_fused_gram_backward_scales_by_the_incoming_gradient():
    """The gradients are computed in forward: backward must still apply the chain rule."""
    inputs = make_inputs(4, 9, 3, 16)
    kw = dict(num_heads=2, tau=3.0, offset=1)
    ref = pair_loss(*inputs, backend="reference", **kw)
    ref_g = torch.autograd.grad(ref * 3.0 + ref ** 2, inputs)
    got = pair_loss(*inputs, backend="chunked", **kw)
    got_g = torch.autograd.grad(got * 3.0 + got ** 2, inputs)
    for name, a, b in zip(NAMES, got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name}: {m}")


def test_chunked_gradients_are_bitwise_repeatable(small_blocks):
    inputs = make_inputs(6, 11, 4, 16, dtype=torch.float32)
    kw = dict(num_heads=2, tau=5.0, offset=3, backend="chunked", chunk_size=4)
    first, first_g = loss_and_grads(inputs, **kw)
    second, second_g = loss_and_grads(inputs, **kw)
    assert torch.equal(first, second)
    for name, a, b in zip(NAMES, first_g, second_g):
        assert torch.equal(a, b), name


def test_chunked_without_grad_is_the_same_loss():
    inputs = make_inputs(5, 12, 3, 16)
    with_grad = pair_loss(*inputs, num_heads=4, tau=2.0, offset=2, backend="chunked")
    with torch.no_grad():
        without = pair_loss(*inputs, num_heads=4, tau=2.0, offset=2, backend="chunked")
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-12, atol=1e-12)


def test_chunked_accepts_half_inputs_and_accumulates_in_fp32():
    inputs32 = make_inputs(4, 9, 5, 16, dtype=torch.float32, seed=1)
    ref = pair_loss(*inputs32, num_heads=4, tau=5.0, offset=2, backend="reference")
    half = [x.detach().to(torch.bfloat16) for x in inputs32]
    got = pair_loss(*half, num_heads=4, tau=5.0, offset=2, backend="chunked")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.detach(), rtol=3e-2, atol=3e-2)


def test_chunked_gradients_of_half_inputs_match_fp32_reference():
    """bf16 features are upcast for the fused pass; their gradients come back in bf16."""
    inputs32 = make_inputs(4, 9, 5, 16, dtype=torch.float32, seed=2)
    half = [x.detach().to(torch.bfloat16).requires_grad_() for x in inputs32]
    ref, ref_g = loss_and_grads([x.detach().float().requires_grad_() for x in half], num_heads=4, tau=5.0,
                                offset=2, backend="reference")
    got, got_g = loss_and_grads(half, num_heads=4, tau=5.0, offset=2, backend="chunked")
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)  # unit targets are rounded to bf16
    for name, a, b in zip(NAMES, got_g, ref_g):
        assert a.dtype == torch.bfloat16, name
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-3, msg=lambda m: f"grad {name}: {m}")


def test_scores_match_reference_and_positions_are_ij():
    inputs = make_inputs(4, 7, 3, 8)
    ref = pair_scores(*inputs, num_heads=2, tau=1.0, backend="reference")
    got = pair_scores(*inputs, num_heads=2, tau=1.0, backend="chunked", chunk_size=2)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # Scoring image 2 alone against text 5 alone gives entry [2, 5].
    keys, values, w_o, q, t, s, b = inputs
    one = pair_scores(keys[2:3], values[2:3], w_o, q[5:6], t[5:6], s, b, num_heads=2, tau=1.0, backend="reference")
    torch.testing.assert_close(one[0, 0], ref[2, 5])


def test_loss_is_sum_over_pairs_over_normaliser_with_positives_at_offset():
    inputs = make_inputs(3, 8, 2, 4)
    scores = pair_scores(*inputs, num_heads=1, tau=1.0, backend="reference").detach()
    labels = -torch.ones_like(scores)
    for i in range(3):
        labels[i, 5 + i] = 1
    expected = -F.logsigmoid(labels * scores).sum() / 16.0
    got = pair_loss(*inputs, num_heads=1, tau=1.0, offset=5, normalizer=16.0, backend="chunked")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_two_shards_with_offsets_sum_to_the_whole_batch():
    """Rank-style split: each half of the images against all texts, with its own offset."""
    inputs = make_inputs(6, 6, 3, 8)
    whole = pair_loss(*inputs, num_heads=2, tau=3.0, backend="chunked")
    k, v = inputs[0], inputs[1]
    parts = [pair_loss(k[i:i + 3], v[i:i + 3], *inputs[2:], num_heads=2, tau=3.0, offset=i, backend="chunked")
             for i in (0, 3)]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole, rtol=1e-10, atol=1e-12)


def test_llip_with_one_token_and_identity_mixing_is_siglip():
    torch.manual_seed(0)
    bi, e = 6, 8
    values = torch.randn(bi, 1, e, dtype=torch.float64)
    keys = torch.randn(bi, 1, e, dtype=torch.float64)  # irrelevant: softmax over one token is 1
    texts = torch.randn(bi, e, dtype=torch.float64)
    queries = torch.randn(bi, e, dtype=torch.float64)
    scale, bias = torch.tensor(2.3, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    eye = torch.eye(e, dtype=torch.float64)
    for backend in ("reference", "chunked"):
        llip = pair_loss(keys, values, eye, queries, texts, scale, bias, num_heads=2, tau=5.0, backend=backend)
        siglip = sigmoid_loss(F.normalize(values[:, 0], dim=-1), F.normalize(texts, dim=-1), scale, bias)
        torch.testing.assert_close(llip, siglip, rtol=1e-12, atol=1e-12)


def test_bad_shapes_and_offsets_are_rejected():
    inputs = make_inputs(4, 6, 2, 8)
    with pytest.raises(ValueError, match="outside the 6 texts"):
        pair_loss(*inputs, num_heads=2, tau=1.0, offset=3)
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        pair_loss(*inputs, num_heads=3, tau=1.0)
    with pytest.raises(ValueError, match="w_o must be"):
        pair_loss(inputs[0], inputs[1], inputs[2][:4], *inputs[3:], num_heads=2, tau=1.0)
    with pytest.raises(ValueError, match="unknown pair backend"):
        pair_loss(*inputs, num_heads=2, tau=1.0, backend="magic")
