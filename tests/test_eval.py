"""Evaluation: hand-built cases with known answers, and agreement with the reference scores."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llip_scale.eval.encode import encode_images, encode_texts, score_all
from llip_scale.eval.mixing import mixing_weights, plot_mixing
from llip_scale.eval.retrieval import recall_at_k
from llip_scale.eval.zeroshot import class_features, topk_accuracy
from llip_scale.model import build_model, model_config
from llip_scale.pairs import pair_scores


def test_topk_accuracy_on_known_scores():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.7], [0.5, 0.4, 0.3], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 1, 2, 2])  # right, 3rd, 3rd, right
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc == {"top1": 0.5, "top2": 0.5, "top5": 1.0}


def test_recall_on_known_scores():
    # 3 images, 5 captions: captions 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2.
    caption_image = torch.tensor([0, 0, 1, 2, 2])
    scores = torch.tensor([
        [0.1, 0.8, 0.9, 0.0, 0.0],  # image 0: best own caption (0.8) ranked 2nd
        [0.0, 0.0, 0.5, 0.1, 0.1],  # image 1: own caption first
        [0.3, 0.28, 0.1, 0.0, 0.25],  # image 2: best own caption (0.25) ranked 3rd
    ])
    r = recall_at_k(scores, caption_image, ks=(1, 2, 3))
    assert [r[f"image_to_text_R@{k}"] for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    # text->image ranks: cap0 img0 0.1 vs 0.0, 0.3 -> rank 1; cap1 rank 0; cap2: img0 0.9 > 0.5 -> 1;
    # cap3: img2 0.0 < 0.1 -> rank 1; cap4: img2 0.25 > 0.1, 0.0 -> rank 0.
    assert [r[f"text_to_image_R@{k}"] for k in (1, 2)] == pytest.approx([2 / 5, 1.0])


def test_class_features_follow_the_llip_protocol():
    class Fake:
        def encode_text(self, tokens):
            x = tokens.float()
            return x * 2.0, x + 1.0  # queries, targets

    tokenize = lambda prompts: torch.tensor([[float(len(p)), float(p.count("b"))] for p in prompts])  # noqa: E731
    q, t = class_features(Fake(), ["a", "bb"], ["{}", "x {}"], tokenize, torch.device("cpu"))
    raw = tokenize(["a", "x a", "bb", "x bb"])
    torch.testing.assert_close(q, (raw * 2.0).view(2, 2, 2).mean(1))
    expected_t = F.normalize(F.normalize(raw + 1.0, dim=-1).view(2, 2, 2).mean(1), dim=-1)
    torch.testing.assert_close(t, expected_t)


def test_eval_path_agrees_with_reference_scores():
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = build_model(cfg).eval()
    images = torch.randn(7, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(3, cfg.text.vocab_size, (5, cfg.text.context_length))
    tokens[:, 6] = cfg.text.eot_id
    dev = torch.device("cpu")
    img = encode_images(model, [images[:4], images[4:]], dev)
    txt = encode_texts(model, tokens, dev, batch_size=2)
    got = score_all(model, img, txt, dev, block=3)
    h = model.head
    with torch.no_grad():
        k, v = model.encode_image(images)
        q, t = model.encode_text(tokens)
        ref = pair_scores(k, v, h.out_proj, q, t, h.logit_scale, h.logit_bias, num_heads=h.num_heads,
                          tau=h.tau, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # Zero-shot on these "classes" = argmax over the same scores.
    acc = topk_accuracy(got, ref.argmax(dim=1))
    assert acc["top1"] == 1.0


def test_mixing_weights_and_plot(tmp_path):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(6, 8, generator=g)
    queries = torch.randn(3, 8, generator=g)
    w = mixing_weights(keys, queries, num_heads=2, tau=1.0)
    assert w.shape == (3, 2, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2))
    red = torch.zeros(16, 16, 3)
    red[..., 0] = 1.0
    fig = plot_mixing(w, ["a red circle", "a blue square", "left of"], [1.0, -2.0, 0.5], image=red.numpy(),
                      title="demo")
    fig.savefig(tmp_path / "mix.png")
    with Image.open(tmp_path / "mix.png") as png:
        size, pixels = png.size, np.asarray(png.convert("RGB")).astype(int)
    assert size == (round(fig.get_figwidth() * fig.dpi), round(fig.get_figheight() * fig.dpi))

    def count(rgb) -> int:  # pixels within 3 levels of a colour
        return int((np.abs(pixels - np.asarray(rgb)).max(-1) <= 3).sum())

    def colour(x: float) -> np.ndarray:
        return np.round(255 * np.asarray(matplotlib.colormaps["viridis"](x)[:3]))

    assert count((255, 0, 0)) > 40 * 40  # the picture is drawn
    # The heat maps span the colour map (vmin 0, vmax the largest weight): the largest weight's
    # cell is its top colour, the smallest weights are near its bottom.
    assert count(colour(1.0)) > 20 * 20
    assert count(colour(float(w.min() / w.max()))) > 20 * 20


def test_caption_mixing_weights_are_the_ones_the_score_uses():
    """Re-mixing the values with the pictured weights gives back the model's own scores."""
    from llip_scale.eval.mixing import caption_mixing

    torch.manual_seed(0)
    model = build_model(model_config("tiny")).eval()
    image = torch.randn(3, 64, 64)
    tokens = torch.randint(3, 300, (4, 32))
    weights, scores = caption_mixing(model, image, tokens)
    keys, values = model.encode_image(image[None])
    queries, targets = model.encode_text(tokens)
    h = model.head.num_heads
    mixed = torch.einsum("nhk,khd->nhd", weights, values[0].view(values.shape[1], h, -1)).reshape(4, -1)
    cos = (F.normalize(mixed @ model.head.out_proj, dim=-1) * F.normalize(targets, dim=-1)).sum(-1)
    expected = model.head.logit_scale.exp() * cos + model.head.logit_bias
    torch.testing.assert_close(scores, expected.detach(), rtol=1e-4, atol=1e-4)
    assert weights.shape == (4, h, keys.shape[1])
