"""Benchmark readers and the suite on tiny stand-ins of each native layout.

Exact numbers come from a colour model: an image's feature is its mean colour, a text's is the
colour of the class (or colour word) it names, and the score is minus their distance, so every
prediction follows from the colours the test paints. A tiny Llip model is compared with a
direct computation through the reference pair backend.
"""
from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llip_scale.data.transforms import OPENAI_MEAN, OPENAI_STD, eval_image
from llip_scale.eval import suite
from llip_scale.eval.cli import main as llip_eval
from llip_scale.eval.datasets import DatasetError, asset_lines, load_benchmark

CPU = torch.device("cpu")
TENCH, GOLDFISH, SHARK = "n01440764", "n01443537", "n01484850"  # ImageNet classes 0, 1, 2
RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


class ColourModel(torch.nn.Module):
    """Scores = -||mean image colour - colour of the named class||; features shaped like Llip's."""

    def __init__(self, colours: dict[str, tuple[int, int, int]]):
        super().__init__()
        self.names = sorted(colours, key=len, reverse=True)  # longest first: "great white shark" before "shark"
        self.palette = torch.tensor([colours[n] for n in self.names], dtype=torch.float32)
        self.prompts: list[str] = []

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        self.prompts += texts
        return torch.tensor([[next(i for i, n in enumerate(self.names) if n in t)] for t in texts])

    def encode_image(self, images):
        std, mean = torch.tensor(OPENAI_STD).view(1, 3, 1, 1), torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
        rgb = ((images * std + mean) * 255).mean(dim=(2, 3))
        return rgb, rgb

    def encode_text(self, tokens):
        c = self.palette[tokens[:, 0]]
        return c, c

    def score(self, image_features, text_features, tau=None):
        return -torch.cdist(image_features[0], text_features[0])


def run(model: ColourModel, name: str, root: Path, image_size: int = 32, batch_size: int = 3) -> dict:
    bench = load_benchmark(name, root)
    return suite.evaluate_benchmark(model, model.tokenize, bench, image_size, CPU, batch_size, stream=io.StringIO())


def paint(path: Path, colour, size=(40, 36)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def imagenet_folders(root: Path, folders: dict[str, list]) -> Path:
    for folder, colours in folders.items():
        for i, colour in enumerate(colours):
            paint(root / folder / f"img_{i}.JPEG", colour)
    return root


# ---------------------------------------------------------------------------------------------
# ImageNet and its variants
# ---------------------------------------------------------------------------------------------

def test_imagenet_evaluates_the_wnid_folders_present_with_the_shipped_names_and_templates(tmp_path):
    imagenet_folders(tmp_path / "val", {TENCH: [RED, RED, GREEN], GOLDFISH: [GREEN, GREEN], SHARK: [BLUE, BLUE]})
    (tmp_path / "val" / TENCH / "notes.txt").write_text("not an image")
    model = ColourModel({"tench": RED, "goldfish": GREEN, "great white shark": BLUE})
    row = run(model, "imagenet1k", tmp_path)
    assert (row["images"], row["classes"], row["templates"]) == (7, 3, 80)
    assert row["top1"] == pytest.approx(6 / 7) and row["top5"] == 1.0  # one tench painted green
    assert row["task"] == "zero-shot classification" and row["seconds"]["images_per_s"] > 0
    templates = asset_lines("imagenet_templates.txt")
    names = ("tench", "goldfish", "great white shark")
    assert set(model.prompts) == {t.replace("{}", c) for t in templates for c in names}


def test_shipped_imagenet_data():
    wnids, names = asset_lines("imagenet_wnids.txt"), asset_lines("imagenet_classnames.txt")
    assert len(wnids) == len(set(wnids)) == len(names) == 1000 and list(wnids) == sorted(wnids)
    assert (wnids[0], names[0], names[999]) == (TENCH, "tench", "toilet paper")
    templates = asset_lines("imagenet_templates.txt")
    assert len(templates) == 80 and all("{}" in t for t in templates)
    for subset in ("imagenet_r_wnids.txt", "imagenet_a_wnids.txt"):
        assert len(set(asset_lines(subset))) == 200 and set(asset_lines(subset)) <= set(wnids)
    assert len(asset_lines("cifar_templates.txt")) == 18


def test_imagenet_v2_folders_are_class_indices(tmp_path):
    imagenet_folders(tmp_path, {"0": [RED], "1": [GREEN, RED], "2": [BLUE]})
    row = run(ColourModel({"tench": RED, "goldfish": GREEN, "great white shark": BLUE}), "imagenet-v2", tmp_path)
    assert (row["classes"], row["images"], row["top1"]) == (3, 4, 0.75)


def test_imagenet_r_and_a_keep_to_their_200_classes(tmp_path):
    r_only, a_only = "n01443537", "n01558993"  # goldfish is in ImageNet-R, robin only in ImageNet-A
    assert r_only in asset_lines("imagenet_r_wnids.txt") and a_only not in asset_lines("imagenet_r_wnids.txt")
    imagenet_folders(tmp_path / "r", {r_only: [GREEN], SHARK: [BLUE]})
    row = run(ColourModel({"goldfish": GREEN, "great white shark": BLUE}), "imagenet-r", tmp_path / "r")
    assert (row["classes"], row["top1"]) == (2, 1.0)
    imagenet_folders(tmp_path / "r", {a_only: [RED]})
    with pytest.raises(DatasetError, match=f"{a_only}.*is not one of the 200 classes of imagenet-r"):
        load_benchmark("imagenet-r", tmp_path / "r")
    imagenet_folders(tmp_path / "a", {a_only: [RED]})
    assert load_benchmark("imagenet-a", tmp_path / "a").classnames == ["American robin"]
    assert load_benchmark("imagenet-sketch", tmp_path / "a").classnames == ["American robin"]  # any of the 1000


def test_imagenet_layout_problems_are_one_line_each(tmp_path):
    with pytest.raises(DatasetError, match=r"val does not exist; expected .*/val/<wnid>/\*\.JPEG"):
        load_benchmark("imagenet1k", tmp_path)
    imagenet_folders(tmp_path / "val", {"cats": [RED]})
    with pytest.raises(DatasetError, match="folder .*cats is not a class folder; expected an ImageNet wnid"):
        load_benchmark("imagenet1k", tmp_path)


def test_an_unreadable_image_is_named(tmp_path):
    imagenet_folders(tmp_path / "val", {TENCH: [RED, RED]})
    (tmp_path / "val" / TENCH / "img_1.JPEG").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetError, match=r"img_1\.JPEG: not a readable image"):
        run(ColourModel({"tench": RED}), "imagenet1k", tmp_path)


# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------

GREYS = [(20 * i + 5,) * 3 for i in range(10)]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_pixels(colours) -> np.ndarray:
    """Rows of 3072 uint8 values (the channel-planar layout of the pickles)."""
    return np.stack([np.broadcast_to(np.array(c, np.uint8)[:, None, None], (3, 32, 32)) for c in colours]
                    ).reshape(len(colours), 3072)


def write_cifar10(root: Path, colours, labels) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "test_batch", "wb") as f:  # bytes keys, as Python 3 reads the distributed pickles
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"data": cifar_pixels(colours), b"labels": labels}, f,
                    protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR10], b"num_vis": 3072}, f, protocol=2)
    return root


def test_cifar10_pickles(tmp_path):
    # One image per class in its own grey; two more of class 0: grey 42 (ranked 4th: top-5 only)
    # and grey 65 (ranked 7th: a miss at 5).
    colours = GREYS + [(42,) * 3, (65,) * 3]
    write_cifar10(tmp_path, colours, list(range(10)) + [0, 0])
    model = ColourModel(dict(zip(CIFAR10, GREYS)))
    row = run(model, "cifar10", tmp_path)
    assert (row["images"], row["classes"], row["templates"]) == (12, 10, 18)
    assert row["top1"] == pytest.approx(10 / 12) and row["top5"] == pytest.approx(11 / 12)
    assert "a blurry photo of a truck." in model.prompts


def test_cifar100_fine_labels_and_names_without_underscores(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = ["apple", "aquarium_fish", "maple_tree"]
    with open(folder / "test", "wb") as f:  # str keys and the newest protocol also work
        pickle.dump({"data": cifar_pixels([RED, GREEN, BLUE, BLUE]), "fine_labels": [0, 1, 2, 1],
                     "coarse_labels": [2, 2, 2, 2]}, f, protocol=5)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["a", "b", "c"]}, f)
    row = run(ColourModel({"apple": RED, "aquarium fish": GREEN, "maple tree": BLUE}), "cifar100", folder)
    assert (row["classes"], row["top1"]) == (3, 0.75)


def test_malformed_cifar_is_named(tmp_path):
    write_cifar10(tmp_path, GREYS, list(range(10)))
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    test_batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"test_batch: expected 'data' uint8 \[N, 3072\]"):
        load_benchmark("cifar10", tmp_path)
    test_batch.write_bytes(pickle.dumps(Path("x")))  # a pickle that names a class: refused, not loaded
    with pytest.raises(DatasetError, match="test_batch is not a readable pickle.*refusing to load"):
        load_benchmark("cifar10", tmp_path)
    test_batch.unlink()
    with pytest.raises(DatasetError, match="test_batch does not exist; expected"):
        load_benchmark("cifar10", tmp_path)


# ---------------------------------------------------------------------------------------------
# COCO and Flickr30k (Karpathy splits)
# ---------------------------------------------------------------------------------------------

def karpathy(root: Path, name: str) -> Path:
    """Three test images (red, green, blue; 5 captions each, one red image's caption says
    "green", and a 6th sentence that must be ignored) and a train image that must not count."""
    colours = {"red": RED, "green": GREEN, "blue": BLUE, "yellow": (220, 220, 0)}
    images = []
    for i, (word, split) in enumerate([("red", "test"), ("green", "test"), ("blue", "test"), ("yellow", "train")]):
        filepath, filename = ("val2014", f"COCO_val2014_{i:012d}.jpg") if name == "coco" else ("", f"{i}.jpg")
        folder = root / filepath if name == "coco" else root / "flickr30k-images"
        paint(folder / filename, colours[word])
        said = [word] * 5 + ["blue"]
        if i == 0:
            said[3] = "green"
        images.append({"filepath": filepath, "filename": filename, "split": split, "imgid": i,
                       "sentences": [{"raw": f" a {w} picture ", "tokens": []} for w in said]})
    (root / f"dataset_{name}.json").write_text(json.dumps({"images": images, "dataset": name}))
    return root


@pytest.mark.parametrize("name", ["coco", "flickr30k"])
def test_karpathy_test_split_retrieval(tmp_path, name):
    model = ColourModel({"red": RED, "green": GREEN, "blue": BLUE, "yellow": (220, 220, 0)})
    row = run(model, name, karpathy(tmp_path, name))
    assert (row["images"], row["captions"], row["task"]) == (3, 15, "retrieval")
    assert "a red picture" in model.prompts  # captions are stripped
    # Image->text: every image's best caption ties for first (ties count as hits).
    assert [row[f"image_to_text_R@{k}"] for k in (1, 5, 10)] == [1.0, 1.0, 1.0]
    # Text->image: the red image's "green" caption ranks its image 2nd.
    assert row["text_to_image_R@1"] == pytest.approx(14 / 15) and row["text_to_image_R@5"] == 1.0


def test_karpathy_problems_are_named(tmp_path):
    with pytest.raises(DatasetError, match="dataset_coco.json does not exist; expected the Karpathy split file"):
        load_benchmark("coco", tmp_path)
    karpathy(tmp_path, "coco")
    next((tmp_path / "val2014").glob("*1.jpg")).unlink()
    with pytest.raises(DatasetError, match=r"COCO_val2014_000000000001\.jpg does not exist \(1 of 3 missing\)"):
        load_benchmark("coco", tmp_path)
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetError, match=r"dataset_coco\.json: not the expected JSON \(KeyError: 'images'\)"):
        load_benchmark("coco", tmp_path)


# ---------------------------------------------------------------------------------------------
# CLIP_benchmark webdatasets
# ---------------------------------------------------------------------------------------------

def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _encoded(colour, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format=fmt)
    return buf.getvalue()


def test_wds_classification_shards(tmp_path):
    (tmp_path / "classnames.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c} thing.\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "nshards.txt").write_text("2\n")
    _tar(tmp_path / "test" / "0.tar", {"s0.webp": _encoded(RED, "WEBP"), "s0.cls": b"0",
                                       "s1.png": _encoded(GREEN, "PNG"), "s1.cls": b"1"})
    _tar(tmp_path / "test" / "1.tar", {"s2.jpg": _encoded(BLUE, "JPEG"), "s2.cls": b"2",
                                       "s3.png": _encoded(BLUE, "PNG"), "s3.cls": b"0"})
    model = ColourModel({"red": RED, "green": GREEN, "blue": BLUE})
    row = run(model, "wds", tmp_path)
    assert row["dataset"] == f"wds/{tmp_path.name}"
    assert (row["images"], row["classes"], row["templates"], row["top1"]) == (4, 3, 2, 0.75)
    assert "a green thing." in model.prompts
    (tmp_path / "test" / "1.tar").unlink()
    with pytest.raises(DatasetError, match=r"shard .*1\.tar does not exist; expected .*\{0\.\.n-1\}\.tar"):
        load_benchmark("wds", tmp_path)


def test_wds_retrieval_shards(tmp_path):
    (tmp_path / "dataset_type.txt").write_text("retrieval\n")
    _tar(tmp_path / "test" / "0.tar", {"a.png": _encoded(RED, "PNG"), "a.txt": b"a red one\nred again",
                                       "b.png": _encoded(BLUE, "PNG"), "b.txt": b"a blue one\na red one"})
    row = run(ColourModel({"red": RED, "blue": BLUE}), "wds", tmp_path)
    assert (row["images"], row["captions"]) == (2, 4)
    assert (row["image_to_text_R@1"], row["text_to_image_R@1"]) == (1.0, 0.75)


# ---------------------------------------------------------------------------------------------
# A real Llip model: the suite's scores are the per-class mixing of the reference backend
# ---------------------------------------------------------------------------------------------

def hash_tokenize(context_length: int, eot: int = 2):
    def tokenize(texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [3 + b % 500 for b in t.encode()][:context_length - 1] + [eot]
            out[i, :len(ids)] = torch.tensor(ids)
        return out
    return tokenize


def test_llip_zero_shot_is_per_class_mixing_through_the_pair_backend(tmp_path):
    from llip_scale.model import build_model, model_config
    from llip_scale.pairs import pair_scores

    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = build_model(cfg, backend="chunked").eval()
    imagenet_folders(tmp_path / "val", {TENCH: [RED, (90, 40, 10)], SHARK: [BLUE, (10, 90, 200), GREEN]})
    bench = load_benchmark("imagenet1k", tmp_path)
    bench.templates = bench.templates[:4]  # the protocol, at a fraction of the text encoding
    tokenize = hash_tokenize(cfg.text.context_length)
    got, _ = suite.classification_scores(model, tokenize, bench, cfg.vision.image_size, CPU, batch_size=2,
                                         stream=io.StringIO())
    # Direct: each class's query = mean over its 80 prompts, target = renormalised mean of unit targets.
    with torch.no_grad():
        images = torch.stack([eval_image(p.read_bytes(), cfg.vision.image_size) for p in bench.source.paths])
        keys, values = model.encode_image(images)
        q, t = [], []
        for name in ("tench", "great white shark"):
            cq, ct = model.encode_text(tokenize([tpl.replace("{}", name) for tpl in bench.templates]))
            q.append(cq.mean(0))
            t.append(F.normalize(F.normalize(ct, dim=-1).mean(0), dim=-1))
        h = model.head
        expected = pair_scores(keys, values, h.out_proj, torch.stack(q), torch.stack(t), h.logit_scale, h.logit_bias,
                               num_heads=h.num_heads, tau=h.tau, backend="reference")
    assert got.shape == (5, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def export_tiny(folder: Path, vocab_size: int) -> Path:
    from safetensors.torch import save_file

    from llip_scale.config import to_dict
    from llip_scale.model import build_model, model_config

    torch.manual_seed(1)
    cfg = model_config("tiny")
    cfg.text.vocab_size = vocab_size
    folder.mkdir()
    save_file(build_model(cfg).state_dict(), str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(json.dumps({"model": to_dict(cfg)}))
    return folder


def test_llip_eval_datasets_table_json_and_progress(tmp_path, demo_data, capsys):
    from llip_scale.interop.pretrained import load_pretrained
    from llip_scale.interop.tokenizers import build_tokenizer

    model_dir = export_tiny(tmp_path / "model", 1024)
    tok = demo_data / "tokenizer.model"
    write_cifar10(tmp_path / "cifar", GREYS, list(range(10)))
    imagenet_folders(tmp_path / "in" / "val", {TENCH: [RED, GREEN], GOLDFISH: [GREEN]})
    karpathy(tmp_path / "coco", "coco")
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    rc = llip_eval([str(model_dir), "--tokenizer", str(tok), "--dataset", f"cifar10={tmp_path / 'cifar'}",
                    "--dataset", f"imagenet1k={tmp_path / 'in'}", "--dataset", f"coco={tmp_path / 'coco'}",
                    "--workers", "2", "--json", str(out_json), "--markdown", str(out_md)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "cifar10: 10/10 images" in captured.err and "images/s" in captured.err
    report = json.loads(out_json.read_text())
    assert report["model"]["name"] == "tiny" and report["model"]["num_tokens"] == 8
    assert report["batch_size"] >= 1 and "per-class mixing" in report["protocol"]["zero-shot"]
    assert report["protocol"]["scores"] == "pair backend chunked"
    assert [r["dataset"] for r in report["results"]] == ["cifar10", "imagenet1k", "coco"]
    # The command's numbers are those of the suite run in this process, without workers.
    model = load_pretrained(model_dir)
    tokenize = build_tokenizer(model.cfg.text.context_length, spm_model=tok)
    benches = suite.load_benchmarks([("cifar10", tmp_path / "cifar"), ("imagenet1k", tmp_path / "in"),
                                     ("coco", tmp_path / "coco")])
    direct = suite.run_suite(model, tokenize, benches, model.cfg.vision.image_size, CPU, 4, stream=io.StringIO())
    for got, want in zip(report["results"], direct):
        for key in ("top1", "top5", "image_to_text_R@1", "text_to_image_R@5"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-9), (want["dataset"], key)
    table = out_md.read_text()
    assert table in captured.out
    assert "| cifar10 | 10 | 10 | 18 |" in table and "| coco | 3 | 15 |" in table
    assert "K=8, H=4" in table.splitlines()[0]


def test_llip_eval_on_an_imported_official_checkpoint_finds_its_bpe_file(tmp_path, capsys):
    import gzip

    import yaml
    from test_scale_official import SMALL, _tool, official_layout

    merges = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(merges, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\nr e\nre d</w>\n")  # 512 byte symbols + 2 merges + 2 specials: end token 515
    text = {**SMALL["text"], "vocab_size": 516, "eot_id": 515}
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"model": {**SMALL, "text": text, "name": "small"}}))
    torch.save(official_layout(SMALL["vision"], text, 32, False), tmp_path / "llip.pt")
    out = tmp_path / "imported"
    assert _tool().main([str(tmp_path / "llip.pt"), str(out), "--config", str(config), "--bpe-vocab", str(merges)]) == 0
    write_cifar10(tmp_path / "cifar", GREYS, list(range(10)))
    args = [str(out), "--dataset", f"cifar10={tmp_path / 'cifar'}", "--workers", "0", "--batch-size", "4"]
    assert llip_eval(args + ["--json", str(tmp_path / "r.json")]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["name"] == "small" and report["results"][0]["images"] == 10
    (out / merges.name).unlink()  # the import bundles its merges file: that one was used
    err = capsys.readouterr().err if llip_eval(args) == 2 else "llip-eval did not fail"
    assert f"CLIP BPE merges file '{out / merges.name}' not found" in err and "Traceback" not in err, err


def test_llip_eval_dataset_problems_are_one_line_before_the_model_loads(tmp_path, capsys):
    cases = [
        (["--dataset", "cifar10"], "expected NAME=ROOT"),
        (["--dataset", f"imagenet={tmp_path}"], "unknown dataset 'imagenet'; expected one of imagenet1k"),
        (["--dataset", f"cifar100={tmp_path / 'nope'}"], "nope does not exist"),
        (["--dataset", f"flickr30k={tmp_path}"], "dataset_flickr30k.json does not exist"),
    ]
    for extra, message in cases:
        assert llip_eval([str(tmp_path / "no_model"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("llip-eval: ") and message in err, err


@pytest.mark.slow
def test_a_built_wheel_ships_the_eval_assets(tmp_path):
    import shutil
    import subprocess
    import sys

    repo, src = Path(__file__).resolve().parents[1], tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "llip_scale", "kernels", "launchers", "configs"):
        (shutil.copytree if (repo / name).is_dir() else shutil.copy)(repo / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist()
    for asset in ("imagenet_classnames.txt", "imagenet_wnids.txt", "imagenet_templates.txt", "imagenet_r_wnids.txt",
                  "imagenet_a_wnids.txt", "cifar_templates.txt"):
        assert f"llip_scale/eval/assets/{asset}" in names


def test_batch_size_follows_free_memory_and_model_size(monkeypatch):
    from llip_scale.model import model_config

    tiny, b16 = model_config("tiny"), model_config("b16")
    monkeypatch.setattr(suite, "available_bytes", lambda device: 4e9)
    small, large = suite.auto_batch_size(b16, CPU, workers=2), suite.auto_batch_size(tiny, CPU, workers=2)
    assert 1 < small < large
    # The working set of the chosen batch fits in a quarter of the free memory; one more image would not.
    per_image = suite.image_batch_bytes(b16, 2)
    assert small * per_image <= 1e9 < (small + 1) * per_image
    monkeypatch.setattr(suite, "available_bytes", lambda device: 1e3)
    assert suite.auto_batch_size(b16, CPU, workers=2) == 1
    monkeypatch.setattr(suite, "available_bytes", lambda device: 1e15)
    assert suite.auto_batch_size(tiny, CPU, workers=2) == 512
    assert suite.available_bytes(CPU) > 0
