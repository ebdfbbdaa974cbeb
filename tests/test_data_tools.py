"""tools/make_shards.py and tools/make_demo_data.py through their command lines, read back by
the pipeline, by plain webdataset, and (demo set) by the tiny model."""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from shardgen import image_bytes, make_tokenizer

from llip_scale.data import DataConfig, Tokenizer, build_train_loader, check_sources
from llip_scale.data.shards import expand_braces
from llip_scale.eval.evalsets import EvalImages, load_retrieval_split, load_zeroshot_split
from llip_scale.model import build_model, model_config

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _run(tool: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOLS / tool), *map(str, args)],
                          capture_output=True, text=True)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc


def _spec(stdout: str) -> str:
    return next(w for w in stdout.split() if w.endswith(".tar"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i in range(7):
        sub = root / ("b" if i % 2 else "a")
        sub.mkdir(exist_ok=True)
        (sub / f"img{i}.png").write_bytes(image_bytes(i))
        if i == 3:
            (sub / f"img{i}.json").write_text(json.dumps({"captions": ["good three a", "good three b"]}))
        else:
            (sub / f"img{i}.txt").write_text(f"good caption {i}\n")
    return root


def _read_back(spec: str, tok: Tokenizer, n_batches: int) -> list[str]:
    cfg = DataConfig(shards=spec, context_length=tok.context_length, workers=1)
    check_sources(cfg)
    loader = build_train_loader(cfg, batch_size=3, rank=0, world_size=1, image_size=16,
                                tokenizer=tok, seed=0)
    return [c for b in itertools.islice(loader, n_batches) for c in b.captions]


def test_make_shards_from_a_folder_reads_back_everywhere(image_folder, tmp_path):
    out = _run("make_shards.py", image_folder, tmp_path / "out", "--per-shard", "3").stdout
    spec = _spec(out)
    urls = expand_braces(spec)
    assert len(urls) == 3 and "wrote 7 samples" in out
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(7)]
    assert all(s["png"].size == (24, 20) for s in samples)
    assert samples[0]["txt"] == "good caption 0"  # folder order: a/img0, a/img2, ..., b/img1
    three = next(s for s in samples if s["json"]["captions"][0] == "good three a")
    assert three["json"]["captions"] == ["good three a", "good three b"]
    seen = set(_read_back(spec, make_tokenizer(tmp_path), 7))
    assert seen <= {f"good caption {i}" for i in range(7)} | {"good three a", "good three b"}
    assert len(seen) >= 5


def test_make_shards_from_csv_and_jsonl(image_folder, tmp_path):
    rows = [{"image": str(p.relative_to(image_folder)), "caption": f"good row {i}", "source": "test"}
            for i, p in enumerate(sorted(image_folder.rglob("*.png")))]
    with (image_folder / "pairs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "source"])
        writer.writeheader()
        writer.writerows(rows)
    (image_folder / "pairs.jsonl").write_text(
        "".join(json.dumps({"path": r["image"], "captions": [r["caption"], "good alt"]}) + "\n"
                for r in rows))
    for name in ("pairs.csv", "pairs.jsonl"):
        out = _run("make_shards.py", image_folder / name, tmp_path / name, "--per-shard", "4").stdout
        samples = list(wds.WebDataset(expand_braces(_spec(out)), shardshuffle=False)
                       .decode("pil"))
        assert [s["txt"] for s in samples] == [r["caption"] for r in rows]
    assert samples[0]["json"]["captions"] == ["good row 0", "good alt"]
    csv_json = next(iter(wds.WebDataset(str(tmp_path / "pairs.csv" / "shard-000000.tar"),
                                        shardshuffle=False).decode()))["json"]
    assert csv_json["source"] == "test"  # extra columns are kept as metadata


def test_make_shards_reports_missing_captions(image_folder, tmp_path):
    (image_folder / "a" / "lonely.png").write_bytes(image_bytes(99))
    try:
        err = _run("make_shards.py", image_folder, tmp_path / "x", ok=False).stderr
        assert "no caption" in err and "lonely.png" in err and "--skip-missing" in err
        out = _run("make_shards.py", image_folder, tmp_path / "y", "--skip-missing").stdout
        assert "wrote 7 samples" in out and "1 skipped" in out
    finally:
        (image_folder / "a" / "lonely.png").unlink()


def _digest(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_data_is_deterministic_and_feeds_the_tiny_model(tmp_path):
    args = ("--train", "96", "--per-shard", "32", "--eval-zeroshot", "70", "--eval-retrieval", "6")
    out = _run("make_demo_data.py", tmp_path / "d1", *args).stdout
    _run("make_demo_data.py", tmp_path / "d2", *args)
    assert _digest(tmp_path / "d1") == _digest(tmp_path / "d2")
    root = tmp_path / "d1"

    model_cfg = model_config("tiny")
    tok = Tokenizer(str(root / "tokenizer.model"), model_cfg.text.context_length)
    assert tok.vocab_size <= model_cfg.text.vocab_size
    assert (tok.eot_id, tok.pad_id) == (model_cfg.text.eot_id, model_cfg.text.pad_id)
    spec = _spec(out)
    assert spec == str(root / "train" / "shard-{000000..000002}.tar")
    cfg = DataConfig(shards=spec, tokenizer=str(root / "tokenizer.model"),
                     context_length=model_cfg.text.context_length, workers=2)
    check_sources(cfg)
    loader = build_train_loader(cfg, batch_size=8, rank=0, world_size=1,
                                image_size=model_cfg.vision.image_size, tokenizer=tok, seed=0)
    batch = next(iter(loader))
    assert batch.images.shape == (8, 3, 64, 64) and batch.tokens.max() < model_cfg.text.vocab_size
    loss = build_model(model_cfg)(batch.images, batch.tokens)
    assert torch.isfinite(loss)

    sample = next(iter(wds.WebDataset(expand_braces(spec), shardshuffle=False).decode()))
    caps = sample["json"]["captions"]
    assert len(caps) >= 4 and len(set(caps)) == len(caps)  # one per object / relation / scene
    assert any(" of " in c or "above" in c or "below" in c or "than" in c for c in caps)

    zs, rt = load_zeroshot_split(root / "eval"), load_retrieval_split(root / "eval")
    assert len(zs.classnames) == 64 and len(zs.images) == 70 and all("{}" in t for t in zs.templates)
    assert sorted(set(zs.labels)) == list(range(64))
    assert len(rt.images) == 6 and all(len(c) == 5 for c in rt.captions)
    assert EvalImages(zs.images, 64)[0].shape == (3, 64, 64)


TESTBED = ("--train", "64", "--per-shard", "32", "--eval-zeroshot", "64", "--eval-retrieval", "6", "--objects", "3",
           "4", "--relations", "2", "--no-scene-caption", "--heldout", "32", "--compositional", "40")
SCENE_CAPTION = re.compile(r"^(one|two|three|four) shapes?:")


def _samples(folder: Path) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False).decode())


def test_testbed_options_are_deterministic_and_shape_the_captions(tmp_path):
    _run("make_demo_data.py", tmp_path / "d1", *TESTBED)
    _run("make_demo_data.py", tmp_path / "d2", *TESTBED)
    assert _digest(tmp_path / "d1") == _digest(tmp_path / "d2")
    root = tmp_path / "d1"
    train, heldout = _samples(root / "train"), _samples(root / "heldout")
    assert (len(train), len(heldout)) == (64, 32)
    for sample in train + heldout:
        caps, objects = sample["json"]["captions"], sample["json"]["objects"]
        assert 3 <= len(objects) <= 4
        # One caption per object, then at most 2 relations, and none that lists the scene.
        assert len(objects) <= len(caps) <= len(objects) + 2
        assert not any(SCENE_CAPTION.match(c) for c in caps)
    # The held-out scenes are drawn from their own stream, not copies of the train scenes.
    assert not {s["jpg"] for s in heldout} & {s["jpg"] for s in train}
    default = _samples(_demo(tmp_path / "plain"))
    assert any(SCENE_CAPTION.match(c) for s in default for c in s["json"]["captions"])


def _demo(out: Path) -> Path:
    _run("make_demo_data.py", out, "--train", "16", "--eval-zeroshot", "0", "--eval-retrieval", "0")
    return out / "train"


def test_compositional_eval_folders(tmp_path):
    _run("make_demo_data.py", tmp_path, *TESTBED)
    joint = load_zeroshot_split(tmp_path / "eval")
    colour, shape = load_zeroshot_split(tmp_path / "eval" / "colour"), load_zeroshot_split(tmp_path / "eval" / "shape")
    assert (len(colour.classnames), len(shape.classnames)) == (8, 8)
    same = [p.resolve() for p in joint.images]
    assert [p.resolve() for p in colour.images] == same and [p.resolve() for p in shape.images] == same
    for label, c, s in zip(joint.labels, colour.labels, shape.labels):
        assert joint.classnames[label] == f"{colour.classnames[c]} {shape.classnames[s]}"
    # Every prompt reads like a training caption: a colour with each shape, a shape with each colour.
    assert [t.replace("{}", "red") for t in colour.templates] == [f"a red {s}." for s in shape.classnames]
    assert [t.replace("{}", "star") for t in shape.templates] == [f"a {c} star." for c in colour.classnames]
    objects = load_retrieval_split(tmp_path / "eval" / "objects")
    assert len(objects.images) == 40 and all(p.is_file() for p in objects.images)
    captions = [c for caps in objects.captions for c in caps]
    assert all(3 <= len(caps) <= 4 for caps in objects.captions)
    assert len(set(captions)) == len(captions)  # one right image per caption
    assert all(re.fullmatch(r"a (small|large) \w+ \w+ (in|on|at) [a-z ]+\.", c) for c in captions), captions[:4]


def test_testbed_options_are_checked_before_writing(tmp_path):
    for args, words in ((("--objects", "3", "2"), "--objects needs 1 <= MIN <= MAX <= 9"),
                        (("--compositional", "300"), "lower it to at most 288")):
        err = _run("make_demo_data.py", tmp_path / "bad", *args, ok=False).stderr
        assert words in err.strip().splitlines()[-1], err  # argparse: usage, then the one error line
        assert not (tmp_path / "bad").exists()
