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

from llip_scale import official
from llip_scale.config import load_config
from llip_scale.model import model_config

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
    sd = {"visual.conv1.weight": make(w, 3, v["patch_size"], v["patch_size"], std=0.05),
          "visual.class_embedding": make(k, w, std=0.5), "visual.positional_embedding": make(grid ** 2 + k, w),
          "token_embedding.weight": make(t["vocab_size"], tw, std=0.5),
          "positional_embedding": make(t["context_length"], tw), "text_projection": make(tw, e, std=tw ** -0.5),
          "q_proj": make(tw, e, std=tw ** -0.5), "k_proj": make(k, w, e, std=w ** -0.5),
          "v_proj": make(k, w, e, std=w ** -0.5), "pred.out_proj": make(e, e, std=e ** -0.5),
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
    """CMP.encode_image: K, V as [B, H, K, d]."""
    b, w, k = images.shape[0], v["width"], v["num_tokens"]
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=v["patch_size"]).reshape(b, w, -1).permute(0, 2, 1)
    x = torch.cat([sd["visual.class_embedding"][None] + torch.zeros(b, k, w), x], dim=1)
    x = F.layer_norm(x + sd["visual.positional_embedding"], (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = x.permute(1, 0, 2)
    for i in range(v["depth"]):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}", v["heads"])
    h = F.layer_norm(x.permute(1, 0, 2)[:, :k], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
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
        model = official.load_imported(tmp_path / "out", backend=backend).eval()
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


@pytest.mark.parametrize("name,size,k,norm", [("llip_b16_k32", "b16", 32, False), ("llip_g14_k64", "g14", 64, True)])
def test_released_sizes_are_detected_and_map_onto_our_model(name, size, k, norm):
    """B/16 K=32 and G/14 K=64 checkpoints, as shapes only (meta tensors, nothing allocated)."""
    cfg = model_config(size)
    as_dict = lambda c: {f.name: getattr(c, f.name) for f in c.__dataclass_fields__.values()}  # noqa: E731
    sd = official_layout(as_dict(cfg.vision), as_dict(cfg.text), cfg.head.embed_dim, norm, device="meta")
    ours, detected = official.convert_state_dict(sd)
    assert detected.name == name and detected.vision.num_tokens == k and detected.head.use_norm == norm
    assert detected.vision.activation == detected.text.activation == "quick_gelu"
    assert (detected.text.eot_id, detected.head.tau, detected.head.num_heads) == (49407, 5.0, 8)
    with torch.device("meta"):
        from llip_scale.model import build_model
        expected = {n: tuple(t.shape) for n, t in build_model(detected).state_dict().items()}
    assert {n: tuple(t.shape) for n, t in ours.items()} == expected


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
