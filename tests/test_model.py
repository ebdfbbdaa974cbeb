"""Towers, heads and baselines on the tiny size."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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


def _hand_mixing_case():
    """Two images, two captions, H = 2 heads of d = 2, K = 2 tokens, tau = 2, W_o = identity.

    Each value is a one-hot per head (token 0: [1, 0], token 1: [0, 1] in both heads), so the
    mixed vector of a pair is its mixing weights: z = [a_h0(k0), a_h0(k1), a_h1(k0), a_h1(k1)].
    """
    keys = torch.tensor([[[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]],    # image 0: tokens 0, 1
                         [[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]])   # image 1
    values = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]).expand(2, 2, 4)
    queries = torch.tensor([[2.0, 0.0, 0.0, 0.0],    # caption 0: only head 0 has a query
                            [0.0, 4.0, 2.0, 0.0]])   # caption 1
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    # softmax_k(<key[i, h, k], q[j, h]> / tau), written out: [image][caption] -> (head 0, head 1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731 - a two-way softmax is a sigmoid
    weights = {
        (0, 0): ((sig(2 / 2), sig(-2 / 2)), (0.5, 0.5)),        # logits h0 (2, 0), h1 (0, 0)
        (0, 1): ((sig(-4 / 2), sig(4 / 2)), (sig(-2 / 2), sig(2 / 2))),  # h0 (0, 4), h1 (0, 2)
        (1, 0): ((sig(6 / 2), sig(-6 / 2)), (0.5, 0.5)),        # h0 (6, 0), h1 (0, 0)
        (1, 1): ((0.5, 0.5), (0.5, 0.5)),                       # h0 (0, 0), h1 (0, 0)
    }
    return keys, values, queries, targets, weights


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_llip_scores_are_the_hand_computed_mixing(backend):
    """The pair head mixes each image's values for each caption with softmax_k(<key, query> / tau)
    per head (no 1/sqrt(d)), then scores exp(logit_scale) * cos(z @ W_o, t) + logit_bias."""
    cfg = model_config("tiny")
    cfg.head.embed_dim, cfg.head.num_heads, cfg.head.tau = 4, 2, 2.0
    model = build_model(cfg, backend=backend).eval()
    keys, values, queries, targets, weights = _hand_mixing_case()
    with torch.no_grad():
        model.head.out_proj.copy_(torch.eye(4))
        model.head.logit_scale.fill_(math.log(3.0))
        model.head.logit_bias.fill_(-1.0)
        scores = model.score((keys, values), (queries, targets))
        by_query = [model.image_embedding((keys, values), query=q) for q in queries]
    for (i, j), ((a00, a01), (a10, a11)) in weights.items():
        z = torch.tensor([a00, a01, a10, a11])
        expected = 3.0 * float(F.cosine_similarity(z, targets[j], dim=0)) - 1.0
        assert float(scores[i, j]) == pytest.approx(expected, rel=1e-5, abs=1e-6), (i, j)
        # The caption-independent embedding with this caption's query mixes the same way.
        torch.testing.assert_close(by_query[j][i], F.normalize(z, dim=0))
