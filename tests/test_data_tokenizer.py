"""Tokenizer: special ids, EOT always present, padding, pickling, tools/train_tokenizer.py."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shardgen import write_good_shards

from llip_scale.config import ConfigError
from llip_scale.data import Tokenizer, train_tokenizer

TOOLS = Path(__file__).resolve().parent.parent / "tools"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "t.model"
    texts = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "square")
             for p in ("left", "right")] * 20
    return train_tokenizer(texts, str(path), vocab_size=200)


def test_special_ids_match_the_text_tower_defaults(tok):
    assert (tok.pad_id, tok.eot_id) == (0, 2)
    assert tok.vocab_size <= 200


def test_rows_end_in_eot_then_padding(tok):
    short = tok(["a red circle"])[0]
    n = len(tok.encode("a red circle"))
    assert short.dtype == torch.int64 and short.shape == (77,)
    assert short[n] == tok.eot_id and (short[n + 1:] == tok.pad_id).all()
    assert (short[:n] > 2).all()  # no special ids inside the text
    long = Tokenizer(tok.path, context_length=8)(["a red circle on the left " * 10, ""])
    assert long.shape == (2, 8)
    assert long[0, -1] == tok.eot_id and (long[0, :-1] != tok.pad_id).all()  # cut, then EOT
    assert long[1, 0] == tok.eot_id and (long[1, 1:] == tok.pad_id).all()


def test_case_folding_decode_and_pickling(tok):
    assert torch.equal(tok(["A RED Circle"]), tok(["a red circle"]))
    assert tok.decode(tok(["a blue square"])[0]) == "a blue square"
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(["a green circle"]), tok(["a green circle"]))


def test_bad_tokenizer_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        Tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a sentencepiece model"):
        Tokenizer(str(tmp_path / "junk.model"))


def test_train_tokenizer_tool_reads_text_jsonl_and_shards(tmp_path):
    (tmp_path / "caps.txt").write_text("a purple star\na pink ring\n")
    (tmp_path / "caps.jsonl").write_text(json.dumps({"captions": ["an orange cross"]}) + "\n"
                                         + json.dumps("a black hexagon") + "\n")
    spec = write_good_shards(tmp_path / "shards", shards=2, per_shard=5)
    out = tmp_path / "tok.model"
    proc = subprocess.run([sys.executable, str(TOOLS / "train_tokenizer.py"), str(tmp_path / "caps.txt"),
                           str(tmp_path / "caps.jsonl"), spec, "--out", str(out), "--vocab-size", "120"],
                          capture_output=True, text=True, check=True)
    assert "trained on 22 captions" in proc.stdout  # 2 + 2 + 6 samples x 1 + 4 x 3
    tok = Tokenizer(str(out), 16)
    assert tok.decode(tok(["an orange cross"])[0]) == "an orange cross"
