"""The switches the official recipes need, through the model: PyTorch's default init for the
vision blocks, the "all tokens" variant (patch outputs as mixture tokens), per-token projections
of the pooled controls, and the baselines' logit-scale init (configs/official/*)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from llip_scale.config import load_config
from llip_scale.model import build_model, model_config

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64, num_tokens=4)


def _cfg(kind="llip", **vision):
    cfg = model_config("tiny")
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **{**TINY, **vision}),
                               text=dataclasses.replace(cfg.text, width=32, depth=1, heads=2, mlp_dim=64),
                               head=dataclasses.replace(cfg.head, kind=kind, embed_dim=32, num_heads=4))


def _batch(cfg, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, cfg.text.vocab_size, (n, cfg.text.context_length), generator=g)
    tokens[:, 5] = cfg.text.eot_id
    return torch.randn(n, 3, 32, 32, generator=g), tokens


@torch.no_grad()
def test_torch_block_init_is_pytorchs_default_for_the_vision_blocks_only():
    torch.manual_seed(0)
    model = build_model(_cfg(block_init="torch", width=64, mlp_dim=128))
    w = 64
    for block in model.visual.transformer.resblocks:
        bound = math.sqrt(6 / (w + 3 * w))  # Xavier-uniform of the fused [3w, w] q/k/v weight
        assert block.attn.in_proj.weight.abs().max() <= bound
        assert float(block.attn.in_proj.weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert torch.count_nonzero(block.attn.in_proj.bias) == torch.count_nonzero(block.attn.out_proj.bias) == 0
        # nn.Linear's default: uniform within 1/sqrt(fan_in), biases included.
        assert block.mlp.c_fc.bias.abs().max() <= w ** -0.5 and block.mlp.c_fc.bias.std() > 0.3 * w ** -0.5
        assert block.mlp.c_proj.weight.abs().max() <= 128 ** -0.5
    # The text blocks keep CLIP's init: normal, std width^-0.5 for q/k/v (beyond the uniform bound).
    text_in = model.text.transformer.resblocks[0].attn.in_proj.weight
    assert float(text_in.std()) == pytest.approx(32 ** -0.5, rel=0.1) and text_in.abs().max() > math.sqrt(6 / 128)
    clip = build_model(_cfg(width=64, mlp_dim=128)).visual.transformer.resblocks[0].mlp.c_proj.weight
    assert float(clip.std()) == pytest.approx(64 ** -0.5 * 4 ** -0.5, rel=0.1)  # depth-scaled, not the default


def test_all_tokens_mixes_the_patches_too_on_every_backend():
    plain_cfg, all_cfg = _cfg(), _cfg(all_tokens=True)
    assert all_cfg.vision.num_outputs == 4 + 16
    torch.manual_seed(0)
    model = build_model(all_cfg, backend="reference")
    images, tokens = _batch(all_cfg)
    plain = build_model(plain_cfg)
    plain.load_state_dict({k: v[:4] if k.startswith("image_proj.") else v for k, v in model.state_dict().items()})
    with torch.no_grad():
        s_all, s_plain = model.visual(images), plain.visual(images)
    assert s_all.shape == (4, 20, 32)
    torch.testing.assert_close(s_all[:, :4], s_plain)  # the mixture tokens, then the 16 patches
    keys, _ = model.encode_image(images)
    assert keys.shape == (4, 20, 32)
    losses, grads = {}, {}
    for backend in ("reference", "chunked"):
        model.zero_grad()
        model.head.backend = backend
        losses[backend] = model(images, tokens)
        losses[backend].backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses["chunked"], losses["reference"], rtol=1e-5, atol=1e-6)
    assert grads["reference"]["image_proj.k_proj"][4:].abs().sum() > 0  # the patch tokens' projections learn
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads["chunked"][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-8,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["meanpool", "registers"])
def test_per_token_projections_of_the_pooled_controls(kind):
    cfg = _cfg(kind)
    cfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, pool_proj="per_token"))
    torch.manual_seed(0)
    model = build_model(cfg)
    images, tokens = _batch(cfg)
    with torch.no_grad():
        s = model.visual(images)  # [B, K, width]
        proj = model.head.proj  # [K, width, E]
        per_token = torch.stack([s[:, k] @ proj[k] for k in range(4)], dim=1)  # s_k @ P_k
        expected = per_token.mean(1) if kind == "meanpool" else per_token[:, 0]
        torch.testing.assert_close(model.encode_image(images)[0], F.normalize(expected, dim=-1))
    assert proj.shape == (4, 32, 32)
    loss = model(images, tokens)
    loss.backward()
    used = (model.head.proj.grad.flatten(1).abs().sum(1) > 0).tolist()
    assert used == ([True] * 4 if kind == "meanpool" else [True, False, False, False])


@pytest.mark.parametrize("name,kind,tokens,proj", [
    ("siglip_b32", "siglip", 1, "shared"), ("clip_b32", "clip", 1, "shared"),
    ("registers_b32_k64", "registers", 64, "per_token"), ("meanpool_b32_k64", "meanpool", 64, "per_token"),
    ("llip_b32_k64_alltokens", "llip", 64, "shared")])
def test_official_baselines_and_controls(name, kind, tokens, proj):
    """configs/official: the release's baselines start the logit scale at ln(1/0.07) (our siglip
    head's own default is ln 10) and share the B/32 recipe's towers."""
    run = load_config(f"official/{name}")
    m = run.model
    assert (m.head.kind, m.vision.num_tokens, m.head.pool_proj) == (kind, tokens, proj)
    assert m.head.logit_scale_init() == pytest.approx(math.log(1 / 0.07))
    assert (m.vision.patch_size, m.vision.width, m.text.width, m.head.embed_dim) == (32, 768, 512, 512)
    assert m.vision.activation == m.text.activation == "quick_gelu" and m.vision.block_init == "torch"
    with torch.device("meta"):
        model = build_model(m)
    if kind == "llip":
        assert model.image_proj.k_proj.shape == (64 + 49, 768, 512)
    elif proj == "per_token":
        assert model.head.proj.shape == (64, 768, 512)  # the release's visual.proj [ncls, width, E]
    if kind != "clip":
        assert m.head.init_logit_bias == -10
    assert load_config("experiments/siglip_b32").model.head.logit_scale_init() == pytest.approx(math.log(10))


def test_a_clip_vocabulary_model_trains_with_the_packaged_clip_bpe():
    """No data.tokenizer and CLIP's vocabulary (the official recipes): the trainer tokenises with
    CLIP BPE, which travels to the loader's worker processes."""
    import pickle

    from llip_scale.data.build import tokenizer_from_config
    from llip_scale.interop.tokenizers import ClipBpeTokenizer

    cfg = load_config("official/llip_l14_k32", ["data.source=webdataset"])
    tok = pickle.loads(pickle.dumps(tokenizer_from_config(cfg)))
    assert isinstance(tok, ClipBpeTokenizer) and tok.context_length == 64
    assert tok(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
