"""Importing the official Llip release: a random state dict in the release's layout, converted
by tools/import_official.py, must give what the release's own formulas (written out below from
facebookresearch/Llip's open_clip model, independently of llip_scale) give."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from llip_scale.config import load_config
from llip_scale.interop import official
from llip_scale.interop.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"vision": {"image_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 2, "mlp_dim": 256,
                    "num_tokens": 4, "activation": "quick_gelu"},
         "text": {"vocab_size": 100, "context_length": 16, "width": 48, "depth": 2, "heads": 3, "mlp_dim": 192,
                  "eot_id": 99, "activation": "quick_gelu"},
         "head": {"kind": "llip", "embed_dim": 32, "num_heads": 4, "tau": 5.0}}


def _tool():
    spec = importlib.util.spec_from_file_location("import_official", ROOT / "tools" / "import_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the release's layout and formulas ----------------------------------------------------------

def official_layout(v: dict, t: dict, e: int, use_norm: bool, device: str = "cpu", seed: int = 0) -> dict:
    """A state dict with the names and shapes of the release's CMP model, random values."""
    g = torch.Generator().manual_seed(seed)
    make = (lambda *shape, std=0.1, mean=0.0: torch.empty(shape, device="meta")) if device == "meta" else \
        (lambda *shape, std=0.1, mean=0.0: mean + std * torch.randn(shape, generator=g))
    w, tw, k, grid = v["width"], t["width"], v["num_tokens"], v["image_size"] // v["patch_size"]
    mixed = k + grid ** 2 if v.get("all_tokens") else k  # pass_all_tokens: a projection per patch too
    sd = {"visual.conv1.weight": make(w, 3, v["patch_size"], v["patch_size"], std=0.05),
          "visual.class_embedding": make(k, w, std=0.5), "visual.positional_embedding": make(grid ** 2 + k, w),
          "token_embedding.weight": make(t["vocab_size"], tw, std=0.5),
          "positional_embedding": make(t["context_length"], tw), "text_projection": make(tw, e, std=tw ** -0.5),
          "q_proj": make(tw, e, std=tw ** -0.5), "k_proj": make(mixed, w, e, std=w ** -0.5),
          "v_proj": make(mixed, w, e, std=w ** -0.5), "pred.out_proj": make(e, e, std=e ** -0.5),
          "logit_scale": make(std=0.0, mean=math.log(10)), "logit_bias": make(std=0.0, mean=-5.0)}
    layer_norms = ["visual.ln_pre", "visual.ln_post", "ln_final"] + (["K_norm", "Q_norm", "V_norm"] if use_norm else [])
    for tower, width, depth, mlp in (("visual.transformer", w, v["depth"], v["mlp_dim"]),
                                     ("transformer", tw, t["depth"], t["mlp_dim"])):
        for i in range(depth):
            p = f"{tower}.resblocks.{i}"
            sd.update({f"{p}.attn.in_proj_weight": make(3 * width, width, std=width ** -0.5),
                       f"{p}.attn.in_proj_bias": make(3 * width), f"{p}.attn.out_proj.weight": make(width, width),
                       f"{p}.attn.out_proj.bias": make(width), f"{p}.mlp.c_fc.weight": make(mlp, width),
                       f"{p}.mlp.c_fc.bias": make(mlp), f"{p}.mlp.c_proj.weight": make(width, mlp),
                       f"{p}.mlp.c_proj.bias": make(width)})
            layer_norms += [f"{p}.ln_1", f"{p}.ln_2"]
    for name in layer_norms:
        size = e if name[1:] == "_norm" else (tw if name == "ln_final" or name.startswith("transformer") else w)
        sd[f"{name}.weight"], sd[f"{name}.bias"] = make(size, mean=1.0), make(size)
    return sd


def _resblock(x, sd, p, heads, mask=None):
    """open_clip ResidualAttentionBlock, LND layout, nn.MultiheadAttention, QuickGELU."""
    w = x.shape[-1]
    y = F.layer_norm(x, (w,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
    attn, _ = F.multi_head_attention_forward(
        y, y, y, w, heads, sd[f"{p}.attn.in_proj_weight"], sd[f"{p}.attn.in_proj_bias"], None, None, False, 0.0,
        sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"], training=False, need_weights=False,
        attn_mask=mask)
    x = x + attn
    y = F.layer_norm(x, (w,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
    y = F.linear(y, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])
    y = y * torch.sigmoid(1.702 * y)
    return x + F.linear(y, sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])


def _norm(x, sd, name, use_norm):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"]) if use_norm else x


def official_encode_image(sd, images, v, num_heads, use_norm):
    """CMP.encode_image: K, V as [B, H, K, d] (pass_all_tokens: K + grid^2 tokens)."""
    b, w, k = images.shape[0], v["width"], v["num_tokens"]
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=v["patch_size"]).reshape(b, w, -1).permute(0, 2, 1)
    x = torch.cat([sd["visual.class_embedding"][None] + torch.zeros(b, k, w), x], dim=1)
    x = F.layer_norm(x + sd["visual.positional_embedding"], (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = x.permute(1, 0, 2)
    for i in range(v["depth"]):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}", v["heads"])
    x = x.permute(1, 0, 2) if v.get("all_tokens") else x.permute(1, 0, 2)[:, :k]
    h = F.layer_norm(x, (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    keys = _norm(h.transpose(0, 1) @ sd["k_proj"], sd, "K_norm", use_norm)  # [K, B, E]
    values = _norm(h.transpose(0, 1) @ sd["v_proj"], sd, "V_norm", use_norm)
    n, b, c = keys.shape
    split = lambda z: z.reshape(n, b, num_heads, c // num_heads).permute(1, 2, 0, 3)  # noqa: E731
    return split(keys), split(values)


def official_encode_text(sd, text, t, num_heads, use_norm):
    """CMP.encode_text: Q [B, H, d] and zt [B, E]; pooled at the argmax token id."""
    length = text.shape[1]
    x = (sd["token_embedding.weight"][text] + sd["positional_embedding"]).permute(1, 0, 2)
    mask = torch.full((length, length), float("-inf")).triu_(1)
    for i in range(t["depth"]):
        x = _resblock(x, sd, f"transformer.resblocks.{i}", t["heads"], mask)
    x = F.layer_norm(x.permute(1, 0, 2), (t["width"],), sd["ln_final.weight"], sd["ln_final.bias"])
    h = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
    q = _norm(h @ sd["q_proj"], sd, "Q_norm", use_norm)
    return q.reshape(q.shape[0], num_heads, -1), h @ sd["text_projection"]


def official_logits(sd, keys, values, q, zt, weight_scale):
    """xAttnPred + CMPLoss.get_logits (zt normalised by the training loop)."""
    attn = (torch.einsum("vhnd,thd->vthn", keys, q) / weight_scale).softmax(-1)
    zv = torch.einsum("vthn,vhnd->vthd", attn, values).reshape(keys.shape[0], q.shape[0], -1) @ sd["pred.out_proj"]
    logits = sd["logit_scale"].exp() * (F.normalize(zt, dim=-1)[None] * F.normalize(zv, dim=-1)).sum(-1)
    return logits + sd["logit_bias"]


# -- tests ----------------------------------------------------------------------------------

def _write_config(tmp_path, use_norm: bool) -> Path:
    model = {**SMALL, "head": {**SMALL["head"], "use_norm": use_norm}, "name": "small"}
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({"model": model, "data": {"context_length": 16}}))
    return path


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)
    text = torch.randint(1, 99, (5, 16), generator=g)
    for row, end in enumerate([3, 15, 7, 1, 10]):  # the end token, then padding
        text[row, end], text[row, end + 1:] = 99, 0
    return images, text


@pytest.mark.parametrize("use_norm", [False, True], ids=["plain", "use_norm"])
def test_converted_checkpoint_reproduces_the_official_formulas(tmp_path, use_norm):
    sd = official_layout(SMALL["vision"], SMALL["text"], 32, use_norm)
    # A training checkpoint of a DDP + torch.compile run, with the early name of pred.out_proj.
    wrapped = {f"module._orig_mod.{k if k != 'pred.out_proj' else 'out_proj'}": v for k, v in sd.items()}
    torch.save({"epoch": 32, "name": "small", "state_dict": wrapped}, tmp_path / "ckpt.pt")
    config = _write_config(tmp_path, use_norm)
    assert _tool().main([str(tmp_path / "ckpt.pt"), str(tmp_path / "out"), "--config", str(config)]) == 0

    images, text = _inputs()
    k_ref, v_ref = official_encode_image(sd, images, SMALL["vision"], 4, use_norm)
    q_ref, zt_ref = official_encode_text(sd, text, SMALL["text"], 4, use_norm)
    logits_ref = official_logits(sd, k_ref, v_ref, q_ref, zt_ref, weight_scale=5.0)
    merge = lambda z: z.permute(0, 2, 1, 3).reshape(z.shape[0], z.shape[2], -1)  # noqa: E731
    for backend in ("reference", "chunked"):
        model = load_pretrained(tmp_path / "out", backend=backend)
        with torch.no_grad():
            keys, values = model.encode_image(images)
            queries, targets = model.encode_text(text)
            scores = model.score((keys, values), (queries, targets))
        torch.testing.assert_close(keys, merge(k_ref), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values, merge(v_ref), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(queries, q_ref.reshape(5, -1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(targets, zt_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores, logits_ref, rtol=1e-4, atol=1e-4)
    assert scores.std() > 0.1  # the comparison is not between constants


def test_linear_out_proj_variant_and_one_token():
    v = {**SMALL["vision"], "num_tokens": 1}
    sd = official_layout(v, SMALL["text"], 32, False)
    overrides = [f"model.{part}.{key}={val}" for part in ("vision", "text", "head")
                 for key, val in {**SMALL, "vision": v}[part].items()]
    cfg = load_config(None, overrides + ["data.context_length=16"]).model
    out_proj = sd.pop("pred.out_proj")
    sd["pred.out_proj.weight"], sd["pred.out_proj.bias"] = out_proj.t().clone(), torch.zeros(32)
    sd["visual.class_embedding"] = sd["visual.class_embedding"][0]  # 1-D when K = 1
    ours, _ = official.convert_state_dict(sd, cfg)
    torch.testing.assert_close(ours["head.out_proj"], out_proj)
    assert ours["visual.mixture_tokens"].shape == (1, 64)
    sd["pred.out_proj.bias"] = torch.ones(32)
    sd["pred.out_proj.weight"] = out_proj.t().clone()
    with pytest.raises(official.OfficialCheckpointError, match="non-zero bias"):
        official.convert_state_dict(sd, cfg)


# The release's model JSONs (facebookresearch/Llip llip/open_clip/model_configs/*.json) and run
# configs (run_configs/llip.py: weight_scale, lr, context_length), as data: vision heads are
# width // head_width (default 64), MLPs int(width * mlp_ratio) (default 4).
RELEASE = {
    "llip_b32_k64": dict(json="ViT-B-32-quickgelu-siglip-ncls:64", embed_dim=512, vision=dict(
        layers=12, width=768, patch_size=32, ncls=64), text=dict(context_length=77, width=512, heads=8, layers=12),
        weight_scale=5, lr=5e-4),
    "llip_b16_k32": dict(json="ViT-B-16-quickgelu-siglip-ncls:32", embed_dim=512, vision=dict(
        layers=12, width=768, patch_size=16, ncls=32), text=dict(context_length=77, width=512, heads=8, layers=12),
        weight_scale=5, lr=5e-4),
    "llip_l14_k32": dict(json="ViT-L-14-quickgelu-siglip-ncls:32", embed_dim=768, vision=dict(
        layers=24, width=1024, patch_size=14, ncls=32), text=dict(context_length=64, width=768, heads=12, layers=12),
        weight_scale=1, lr=4e-4),
    "llip_h14_k64": dict(json="ViT-H-14-quickgelu-siglip-ncls:64-norm", embed_dim=1024, use_norm=True, vision=dict(
        layers=32, width=1280, head_width=80, patch_size=14, ncls=64),
        text=dict(context_length=77, width=1024, heads=16, layers=24), weight_scale=5, lr=4e-4),
    "llip_g14_k64": dict(json="ViT-bigG-14-quickgelu-siglip-ncls:64-norm", embed_dim=1280, use_norm=True, vision=dict(
        layers=48, width=1664, head_width=104, mlp_ratio=4.9231, patch_size=14, ncls=64),
        text=dict(context_length=77, width=1280, heads=20, layers=32), weight_scale=5, lr=4e-4),
    "llip_b32_k64_alltokens": dict(json="ViT-B-32-quickgelu-siglip-ncls:64-alltokens", embed_dim=512, vision=dict(
        layers=12, width=768, patch_size=32, ncls=64, pass_all_tokens=True),
        text=dict(context_length=77, width=512, heads=8, layers=12), weight_scale=5, lr=5e-4),
}


def _as_dict(c) -> dict:
    return {f.name: getattr(c, f.name) for f in c.__dataclass_fields__.values()}


@pytest.mark.parametrize("name", list(RELEASE))
def test_official_configs_have_the_releases_shapes_and_recipe(name):
    rel, run = RELEASE[name], load_config(f"official/{name}")
    v, t, h = run.model.vision, run.model.text, run.model.head
    rv, rt = rel["vision"], rel["text"]
    assert (v.image_size, v.patch_size, v.width, v.depth) == (224, rv["patch_size"], rv["width"], rv["layers"])
    assert v.heads == rv["width"] // rv.get("head_width", 64)
    assert v.mlp_dim == int(rv["width"] * rv.get("mlp_ratio", 4.0))
    assert (v.num_tokens, v.all_tokens) == (rv["ncls"], rv.get("pass_all_tokens", False))
    assert (t.vocab_size, t.context_length, t.width, t.heads, t.depth, t.mlp_dim) == (
        49408, rt["context_length"], rt["width"], rt["heads"], rt["layers"], 4 * rt["width"])
    assert run.data.context_length in (None, rt["context_length"])
    assert (h.kind, h.embed_dim, h.num_heads, h.use_norm, h.tau) == (
        "llip", rel["embed_dim"], 8, rel.get("use_norm", False), rel["weight_scale"])
    assert v.activation == t.activation == "quick_gelu" and v.block_init == "torch"
    assert h.logit_scale_init() == pytest.approx(math.log(1 / 0.07)) and h.init_logit_bias == -10
    assert (run.optim.lr, run.optim.betas, run.optim.eps, run.optim.weight_decay, run.optim.warmup_steps) == (
        rel["lr"], (0.9, 0.95), 1e-6, 0.2, 2000)
    assert run.batch_size * run.steps == 32 * 400_000_000  # 32 epochs of 400M at 32,768


@pytest.mark.parametrize("name", list(RELEASE))
def test_every_released_size_is_detected_and_maps_onto_our_model(name):
    """Full-size checkpoints as shapes only (meta tensors, nothing allocated)."""
    cfg = load_config(f"official/{name}").model
    v = {**_as_dict(cfg.vision)}
    sd = official_layout(v, _as_dict(cfg.text), cfg.head.embed_dim, cfg.head.use_norm, device="meta")
    ours, detected = official.convert_state_dict(sd)
    assert detected.name == name and detected == cfg
    with torch.device("meta"):
        from llip_scale.model import build_model
        expected = {n: tuple(t.shape) for n, t in build_model(detected).state_dict().items()}
    assert {n: tuple(t.shape) for n, t in ours.items()} == expected
    assert ours["image_proj.k_proj"].shape[0] == cfg.vision.num_outputs
    # The release stores the logit scale and bias 0-dim; ours are [1].
    assert sd["logit_scale"].shape == sd["logit_bias"].shape == ()
    assert ours["head.logit_scale"].shape == ours["head.logit_bias"].shape == (1,)


def _scaled_down(cfg):
    """The official config with narrow widths (2 channels per attention head, E = 16) and
    everything else kept: depths, K, all_tokens, image and patch size, context, vocabulary,
    use_norm, tau, QuickGELU."""
    import dataclasses

    v, t = cfg.vision, cfg.text
    vision = dataclasses.replace(v, width=2 * v.heads, mlp_dim=4 * v.heads)
    text = dataclasses.replace(t, width=2 * t.heads, mlp_dim=4 * t.heads)
    return dataclasses.replace(cfg, vision=vision, text=text, head=dataclasses.replace(cfg.head, embed_dim=16))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("llip_h14_k64", "llip_g14_k64")
                                  else n for n in RELEASE])  # the deep ones take seconds each
def test_every_released_size_reproduces_the_official_forward(name):
    """A release-layout state dict of each size (widths scaled down), converted, gives the
    official formulas' keys, values, queries, targets and scores."""
    cfg = _scaled_down(load_config(f"official/{name}").model)
    v, t, e, norm = _as_dict(cfg.vision), _as_dict(cfg.text), cfg.head.embed_dim, cfg.head.use_norm
    sd = official_layout(v, t, e, norm, seed=len(name))
    ours, _ = official.convert_state_dict(sd, cfg)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 224, 224, generator=g)
    text = torch.randint(1, 49000, (3, t["context_length"]), generator=g)
    for row, end in enumerate([4, t["context_length"] - 1, 9]):
        text[row, end], text[row, end + 1:] = 49407, 0
    k_ref, v_ref = official_encode_image(sd, images, v, 8, norm)
    q_ref, zt_ref = official_encode_text(sd, text, t, 8, norm)
    logits_ref = official_logits(sd, k_ref, v_ref, q_ref, zt_ref, weight_scale=cfg.head.tau)
    from llip_scale.model import build_model
    model = build_model(cfg, backend="chunked").eval()
    model.load_state_dict(ours)
    with torch.no_grad():
        keys, values = model.encode_image(images)
        scores = model.score((keys, values), model.encode_text(text))
    merge = lambda z: z.permute(0, 2, 1, 3).reshape(z.shape[0], z.shape[2], -1)  # noqa: E731
    assert keys.shape == (2, cfg.vision.num_outputs, 16)
    torch.testing.assert_close(keys, merge(k_ref), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(values, merge(v_ref), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, logits_ref, rtol=1e-4, atol=1e-4)
    assert scores.std() > 0.01


def test_wrong_layout_lists_missing_and_unexpected_keys(tmp_path, capsys):
    sd = official_layout(SMALL["vision"], SMALL["text"], 32, False)
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    sd["visual.proj"] = torch.zeros(64, 32)
    torch.save(sd, tmp_path / "bad.pt")
    config = _write_config(tmp_path, False)
    assert _tool().main([str(tmp_path / "bad.pt"), str(tmp_path / "out"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "missing 1: transformer.resblocks.1.mlp.c_fc.bias" in err and "unexpected 1: visual.proj" in err
    assert "CLIP/SigLIP" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_config_mismatches_are_named(tmp_path):
    sd = official_layout(SMALL["vision"], SMALL["text"], 32, True)
    cfg = load_config(_write_config(tmp_path, False)).model
    with pytest.raises(official.OfficialCheckpointError, match="set model.head.use_norm"):
        official.convert_state_dict(sd, cfg)
    cfg = load_config(_write_config(tmp_path, True), ["model.vision.mlp_dim=128"]).model
    with pytest.raises(official.OfficialCheckpointError, match=r"mlp.c_fc.weight \(256, 64\)"):
        official.convert_state_dict(sd, cfg)
    with pytest.raises(official.OfficialCheckpointError, match="matches none of"):
        official.convert_state_dict(sd)
