"""The open_clip-style API: ``create_model_and_transforms`` and ``get_tokenizer`` on names, exports
and official checkpoints; ``score`` on raw images and tokens; the caption-independent
``image_embedding``. (The export tool on a trained run is covered in test_train_webdataset.py.)"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file

import llip_scale
from llip_scale.config import ConfigError
from llip_scale.data.tokenizer import Tokenizer, train_tokenizer
from llip_scale.data.transforms import eval_image
from llip_scale.interop.factory import resolve, write_inference_file
from llip_scale.interop.pretrained import load_pretrained
from llip_scale.interop.tokenizers import ClipBpeTokenizer
from llip_scale.model import build_model, model_config

SMALL = {"vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64,
                    "num_tokens": 4},
         "text": {"vocab_size": 64, "context_length": 12, "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64},
         "head": {"embed_dim": 32, "num_heads": 4, "tau": 2.0}}


def _picture(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _small_model(kind: str = "llip", backend: str = "reference", vocab_size: int = 64):
    cfg = model_config("tiny")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **SMALL["vision"]),
                              text=dataclasses.replace(cfg.text, **{**SMALL["text"], "vocab_size": vocab_size}),
                              head=dataclasses.replace(cfg.head, **SMALL["head"], kind=kind))
    torch.manual_seed(0)
    return build_model(cfg, backend=backend).eval()


def _inputs(model, n_images=3, n_texts=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    s, t = model.cfg.vision.image_size, model.cfg.text
    tokens = torch.randint(3, t.vocab_size, (n_texts, t.context_length), generator=g)
    tokens[:, 6] = t.eot_id
    return torch.randn(n_images, 3, s, s, generator=g), tokens


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    train_tokenizer(["a red circle", "a blue square above a green star", "two small shapes"] * 20, str(path),
                    vocab_size=60)
    return path


def _export(model, folder, tokenizer=None):
    """A folder as tools/export_checkpoint.py writes one: weights, model config, inference.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(model.cfg)}))
    write_inference_file(folder, resolve(folder), tokenizer, require_tokenizer=False)
    return folder


def test_a_zoo_name_gives_a_fresh_model_and_the_loaders_transforms():
    model, train, val = llip_scale.create_model_and_transforms("tiny")
    assert model.cfg.name == "tiny" and not model.training
    img = _picture()
    torch.testing.assert_close(val(img), eval_image(img, 64), rtol=0, atol=0)
    crop = train(img)
    assert crop.shape == (3, 64, 64) and crop.dtype == torch.float32
    assert -3 < float(crop.mean()) < 3 and crop.std() > 0.1  # normalised pixels, not raw ones
    half = llip_scale.create_model("tiny", precision="bf16")
    assert half.visual.conv1.weight.dtype == torch.bfloat16


def test_score_takes_raw_inputs_or_features_on_every_backend():
    model = _small_model()
    images, tokens = _inputs(model)
    with torch.no_grad():
        from_features = model.score(model.encode_image(images), model.encode_text(tokens))
        raw = {b: (setattr(model.head, "backend", b), model.score(images, tokens))[1] for b in ("reference", "chunked")}
    assert from_features.shape == (3, 5) and from_features.std() > 0
    for backend, scores in raw.items():
        torch.testing.assert_close(scores, from_features, rtol=1e-5, atol=1e-5, msg=backend)


def test_image_embedding_is_the_mixing_with_uniform_weights_or_one_query():
    model = _small_model()
    images, tokens = _inputs(model)
    with torch.no_grad():
        keys, values = model.encode_image(images)
        uniform = model.image_embedding(images)
        # Uniform weights over the K tokens in every head: the mean value, then W_o.
        torch.testing.assert_close(uniform, F.normalize(values.mean(1) @ model.head.out_proj, dim=-1))
        # With caption j's own query, the embedding is what the score of (image, caption j) compares.
        queries, _ = model.encode_text(tokens)
        scores = model.score(images, tokens)
        texts = model.text_embedding(tokens)
        scale, bias = model.head.logit_scale.exp(), model.head.logit_bias
        for j in range(tokens.shape[0]):
            cos = model.image_embedding(images, query=queries[j]) @ texts[j]
            torch.testing.assert_close(scale * cos + bias, scores[:, j], rtol=1e-5, atol=1e-5)
    assert uniform.shape == (3, 32) and not torch.allclose(uniform, model.image_embedding(images, queries[0]))


def test_image_embedding_of_a_baseline_is_its_pooled_vector():
    model = _small_model("siglip")
    images, tokens = _inputs(model)
    with torch.no_grad():
        emb = model.image_embedding(images)
        torch.testing.assert_close(emb, model.encode_image(images)[0])
        expected = model.head.logit_scale.exp() * emb @ model.text_embedding(tokens).t() + model.head.logit_bias
        torch.testing.assert_close(model.score(images, tokens), expected)


def test_an_export_folder_alone_loads_in_three_lines(tmp_path, sp_model):
    original = _small_model()
    local_copy = tmp_path / "tok.model"
    local_copy.write_bytes(sp_model.read_bytes())
    out = _export(original, tmp_path / "export", tokenizer=local_copy)
    local_copy.unlink()  # the export carries its own copy
    assert (out / "tokenizer.model").is_file()

    model, _, preprocess = llip_scale.create_model_and_transforms(out, backend="reference")
    tokenizer = llip_scale.get_tokenizer(out)
    images = torch.stack([preprocess(_picture(seed=i)) for i in range(2)])
    captions = ["a red circle", "two small shapes above a star"]
    scores = model.score(images, tokenizer(captions))

    assert isinstance(tokenizer, Tokenizer) and tokenizer.context_length == 12
    torch.testing.assert_close(tokenizer(captions), Tokenizer(str(sp_model), 12)(captions))
    with torch.no_grad():
        expected = original.score(images, Tokenizer(str(sp_model), 12)(captions))
    torch.testing.assert_close(scores, expected)
    assert preprocess.image_size == 32
    # The .safetensors file names the same export.
    again = llip_scale.create_model(out / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("kind", ["llip", "siglip"])
def test_an_export_with_0dim_logit_parameters_still_loads(tmp_path, kind):
    """Exports written while the logit scale and bias were 0-dim tensors load (as [1]) through
    load_pretrained and create_model, and score as the model they were exported from."""
    original = _small_model(kind)
    with torch.no_grad():
        original.head.logit_scale.fill_(1.5)
        original.head.logit_bias.fill_(-3.0)
    old = {k: v.reshape(()) if k in ("head.logit_scale", "head.logit_bias") else v
           for k, v in original.state_dict().items()}
    assert old["head.logit_scale"].dim() == 0
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "model.safetensors"))
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(original.cfg)}))
    images, tokens = _inputs(original)
    with torch.no_grad():
        expected = original.score(images, tokens)
    for model in (llip_scale.load_pretrained(tmp_path / "old", backend="reference"),
                  llip_scale.create_model(tmp_path / "old", backend="reference")):
        assert model.head.logit_scale.shape == model.head.logit_bias.shape == (1,)
        assert model.head.logit_scale.item() == 1.5 and model.head.logit_bias.item() == -3.0
        with torch.no_grad():
            torch.testing.assert_close(model.score(images, tokens), expected)


def test_pretrained_weights_into_a_named_architecture_must_fit(tmp_path):
    out = _export(_small_model(), tmp_path / "export")  # no tokenizer given: the small vocabulary has none
    with pytest.raises(ConfigError, match="do not fit model 'tiny'"):
        llip_scale.create_model("tiny", pretrained=out)
    with pytest.raises(ConfigError, match="names no tokenizer"):
        llip_scale.get_tokenizer(out)


def test_official_checkpoint_through_the_factory(tmp_path):
    """A release-layout .pt loaded with create_model (architecture from a config) equals the
    importer's result, and its tokenizer is CLIP BPE from the packaged vocabulary."""
    from test_scale_official import SMALL as OFFICIAL_SMALL
    from test_scale_official import _tool, _write_config, official_layout

    sd = official_layout(OFFICIAL_SMALL["vision"], OFFICIAL_SMALL["text"], 32, False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pt")
    config = _write_config(tmp_path, False)
    model = llip_scale.create_model(config, pretrained=tmp_path / "ckpt.pt")
    assert _tool().main([str(tmp_path / "ckpt.pt"), str(tmp_path / "out"), "--config", str(config)]) == 0
    imported = load_pretrained(tmp_path / "out")
    for name, value in imported.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert yaml.safe_load((tmp_path / "out" / "inference.yaml").read_text())["preprocess"]["image_size"] == 32


def test_tokenizers_by_name_and_by_file(sp_model):
    clip = llip_scale.get_tokenizer("b16")
    assert isinstance(clip, ClipBpeTokenizer) and clip.context_length == 77
    assert clip(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    sp = llip_scale.get_tokenizer(sp_model, context_length=9)
    assert isinstance(sp, Tokenizer) and sp(["a red circle"]).shape == (1, 9)
    with pytest.raises(ConfigError, match="own vocabulary"):
        llip_scale.get_tokenizer("tiny")


@pytest.mark.parametrize("call,match", [
    (lambda: llip_scale.create_model("vit-huge-99"), "neither an existing path nor a known model"),
    (lambda: llip_scale.create_model("tiny", precision="fp8"), "precision 'fp8'"),
])
def test_bad_names_fail_in_one_line(call, match):
    with pytest.raises(ConfigError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def _tool(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_knn_accuracy_on_known_neighbourhoods():
    knn_top1 = _tool("image_embedding_retrieval").knn_top1
    points = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, -0.1], [0.1, 1.0], [0.0, 1.0], [-0.1, 1.0]]), dim=1)
    assert knn_top1(points, torch.tensor([0, 0, 0, 1, 1, 1]), k=2) == 1.0
    assert knn_top1(points, torch.tensor([0, 1, 0, 1, 0, 1]), k=1) == 0.0  # each nearest neighbour disagrees


def test_image_embedding_tool_reports_the_pair_heads_own_retrieval(demo_data, tmp_path):
    from llip_scale.eval.run import evaluate

    model = _small_model(backend="chunked", vocab_size=512)  # the demo tokenizer has ~360 pieces
    out = _export(model, tmp_path / "export", tokenizer=demo_data / "tokenizer.model")
    table = tmp_path / "table.md"
    assert _tool("image_embedding_retrieval").main([str(out), "--eval", str(demo_data / "eval"), "--out", str(table)]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.read_text().splitlines() if line.startswith("| ") and "scores" not in line}
    assert set(rows) == {"per caption (pair head)", "uniform mixing", "mean-query mixing"}
    expected = evaluate(model, llip_scale.get_tokenizer(out), 32, torch.device("cpu"),
                        retrieval_dir=str(demo_data / "eval"), zeroshot_dir=str(demo_data / "eval"))
    per_caption = rows["per caption (pair head)"]
    assert per_caption[0] == f"{100 * expected['retrieval/image_to_text_R@1']:.1f}"
    assert per_caption[5] == f"{100 * expected['zeroshot/top5']:.1f}" and per_caption[6] == "-"
    assert 0 <= float(rows["uniform mixing"][6]) <= 100
