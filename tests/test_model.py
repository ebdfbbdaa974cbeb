"""Towers, heads and baselines on the tiny size."""
from __future__ import annotations

import math

import pytest
import torch

from llip_scale.model import build_model, model_config
from llip_scale.model.text import eot_positions


def batch(cfg, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tokens = torch.randint(3, cfg.text.vocab_size, (n, cfg.text.context_length), generator=g)
    tokens[:, 9] = cfg.text.eot_id
    tokens[:, 10:] = cfg.text.pad_id
    return images, tokens


@pytest.mark.parametrize("kind", ["llip", "siglip", "clip", "registers", "meanpool"])
def test_every_head_trains_forward_backward(kind):
    torch.manual_seed(0)
    cfg = model_config("tiny", kind=kind)
    model = build_model(cfg)
    images, tokens = batch(cfg)
    loss = model(images, tokens)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    # Adam moves every parameter by about lr per step whatever its gradient's scale; plain SGD
    # with a large step overshoots on the logit bias (its gradient is ~1 per positive pair).
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):  # a few steps on one batch must lower the loss
        opt.step()
        opt.zero_grad()
        new = model(images, tokens)
        new.backward()
    assert new.item() < loss.item()


def test_llip_encoders_and_scores_shapes():
    cfg = model_config("tiny")
    model = build_model(cfg).eval()
    images, tokens = batch(cfg, n=3)
    keys, values = model.encode_image(images)
    q, t = model.encode_text(tokens[:2])
    k, e = cfg.vision.num_tokens, cfg.head.embed_dim
    assert keys.shape == values.shape == (3, k, e) and q.shape == t.shape == (2, e)
    with torch.no_grad():
        s = model.score((keys, values), (q, t))
    assert s.shape == (3, 2)
    # A score does not depend on the other texts in the set.
    with torch.no_grad():
        s1 = model.score((keys, values), (q[1:], t[1:]))
    torch.testing.assert_close(s1[:, 0], s[:, 1], rtol=1e-5, atol=1e-5)


def test_logit_init():
    cfg = model_config("tiny")
    model = build_model(cfg)
    assert model.head.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert model.head.logit_bias.item() == -10.0
    assert build_model(model_config("tiny", kind="siglip")).head.logit_scale.item() == pytest.approx(math.log(10))


@pytest.mark.parametrize("kind", ["llip", "siglip", "clip"])
def test_no_parameter_is_0dim(kind):
    """DeepSpeed broadcasts and partitions parameters through a flat byte view
    (``param.data.view(torch.uint8)``), which fails on a 0-dim tensor: the logit scale and bias
    are [1]."""
    model = build_model(model_config("tiny", kind=kind))
    assert [n for n, p in model.named_parameters() if p.dim() == 0] == []
    assert model.head.logit_scale.shape == (1,)
    with pytest.raises(RuntimeError, match="cannot be 0"):
        torch.zeros(()).view(torch.uint8)  # what a 0-dim parameter would meet


def test_text_is_pooled_at_first_eot_and_causal():
    cfg = model_config("tiny")
    model = build_model(cfg).eval()
    _, tokens = batch(cfg, n=2)
    assert eot_positions(tokens, cfg.text.eot_id).tolist() == [9, 9]
    no_eot = torch.full((1, 5), 7)
    assert eot_positions(no_eot, cfg.text.eot_id).tolist() == [4]
    changed = tokens.clone()
    changed[:, 11:] = 5  # after the EOT: invisible to a causal model pooled at the EOT
    with torch.no_grad():
        torch.testing.assert_close(model.text(tokens), model.text(changed))
        changed[:, 3] = 6  # before the EOT: visible
        assert not torch.allclose(model.text(tokens), model.text(changed))


def test_one_mixture_token_is_a_cls_vit():
    cfg = model_config("tiny")
    cfg.vision.num_tokens = 1
    model = build_model(cfg)
    images, _ = batch(cfg, n=2)
    assert model.visual(images).shape == (2, 1, cfg.vision.width)
    assert model.visual.positional_embedding.shape[0] == cfg.vision.grid ** 2 + 1


def test_mixture_tokens_differ_per_caption():
    """Llip's point: the same image gets a different vector for different captions."""
    cfg = model_config("tiny")
    model = build_model(cfg).eval()
    images, tokens = batch(cfg, n=2)
    with torch.no_grad():
        keys, values = model.encode_image(images[:1])
        q, _ = model.encode_text(tokens)
        h, d = cfg.head.num_heads, cfg.head.embed_dim // cfg.head.num_heads
        logits = torch.einsum("khd,jhd->jhk", keys[0].view(-1, h, d), q.view(-1, h, d))
    weights = torch.softmax(logits / cfg.head.tau, -1)
    assert not torch.allclose(weights[0], weights[1])
