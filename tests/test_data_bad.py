"""Bad data is skipped, counted per reason and logged; too much of it stops with the shard named."""
from __future__ import annotations

import itertools
import logging
import tarfile

import pytest
from shardgen import good_members, image_bytes, make_tokenizer, write_tar

from llip_scale.data import DataConfig, DataError, build_train_loader

BATCH = 4
BAD_SAMPLES = [  # (members, reason): each reason once per pass over mixed.tar
    ([("000000100.png", b"\x89PNG not really"), ("000000100.txt", b"good but no image")], "bad_image"),
    ([("000000101.png", image_bytes(101))], "missing_caption"),
    ([("000000102.png", image_bytes(102)), ("000000102.txt", b"  \n\t ")], "empty_caption"),
    ([("000000103.png", image_bytes(103)), ("000000103.txt", b"caf\xe9 latin-1")], "non_utf8_text"),
    ([("000000104.png", image_bytes(104)), ("000000104.json", b"{not json")], "bad_json"),
    ([("000000105.txt", b"a caption without an image")], "missing_image"),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    bad = [m for members, _ in BAD_SAMPLES for m in members]
    write_tar(root / "mixed.tar", bad + [m for i in range(BATCH) for m in good_members(i)])
    write_tar(root / "good.tar", [m for i in range(10, 10 + BATCH) for m in good_members(i)])
    (root / "zero.tar").write_bytes(b"")
    full_path = write_tar(root / "full.tar", [m for i in range(20, 25) for m in good_members(i)])
    with tarfile.open(full_path) as tf:
        last_data = tf.getmembers()[-1].offset_data
    full = full_path.read_bytes()
    (root / "cut_early.tar").write_bytes(full[:700])  # inside the first image
    (root / "cut_late.tar").write_bytes(full[: last_data + 2])  # inside the 5th sample's caption
    write_tar(root / "empty.tar", [])
    (root / "garbage.tar").write_bytes(b"this is not a tar archive at all " * 40)
    return root, make_tokenizer(root)


def _loader(shards, spec: str, workers: int = 0, **cfg):
    """One stream unless told otherwise: a batch is then one pass over a shard of 4 good samples."""
    root, tok = shards
    spec = "::".join(str(root / s) if not s.startswith("pipe:") else s for s in spec.split("::"))
    cfg = DataConfig(shards=spec, context_length=tok.context_length, workers=workers,
                     shuffle_buffer=cfg.pop("shuffle_buffer", 1), streams=cfg.pop("streams", 1), **cfg)
    return build_train_loader(cfg, batch_size=BATCH, rank=0,
                              world_size=1, image_size=8, tokenizer=tok, seed=0)


def _captions(tok, batch) -> list[str]:
    return [tok.decode(row) for row in batch.tokens]


def test_each_bad_sample_kind_is_skipped_and_counted(shards):
    tok = shards[1]
    batches = list(itertools.islice(_loader(shards, "mixed.tar"), 3))
    for n, b in enumerate(batches, 1):  # a batch is one pass; bad samples come first (no shuffle)
        assert b.skipped == {reason: n for _, reason in sorted(BAD_SAMPLES, key=lambda x: x[1])}
        assert all(c.startswith("good") for c in _captions(tok, b))


def test_each_bad_shard_kind_is_skipped_and_counted(shards, caplog):
    spec = "good.tar::zero.tar::cut_early.tar::empty.tar::garbage.tar::pipe:cat /nonexistent/shard.tar"
    reasons = [None, "zero_byte_shard", "truncated_tar", "empty_shard", "bad_tar", "unreadable_shard"]
    with caplog.at_level(logging.WARNING, logger="llip_scale.data"):
        batches = list(itertools.islice(_loader(shards, spec, max_skip_rate=0.99), 12))
    last = batches[-1]
    draws = last.state["stream_states"][0]["sampler"]["draws"]
    # Each batch is one pass over good.tar, so every other shard drawn so far was read to its end.
    expected = {r: d for r, d in zip(reasons, draws) if r and d}
    assert last.skipped == dict(sorted(expected.items()))
    assert len(expected) == 5, "every bad shard kind was drawn at least once"
    assert "zero_byte_shard" in caplog.text and "zero.tar" in caplog.text


def test_samples_before_a_truncation_are_used(shards):
    tok = shards[1]
    batches = list(itertools.islice(_loader(shards, "cut_late.tar", max_skip_rate=0.5), 6))
    assert all(len(b.captions) == BATCH for b in batches)
    for n, b in enumerate(batches, 1):  # 4 complete samples per pass: one batch, then the cut
        assert b.skipped == ({"truncated_tar": n - 1} if n > 1 else {})
        assert all(c.startswith("good") for c in _captions(tok, b))


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_rate_above_the_limit_stops_naming_the_shard(shards, workers):
    loader = _loader(shards, "mixed.tar", workers, max_skip_rate=0.2, skip_check_after=20)
    with pytest.raises(DataError) as err:
        list(itertools.islice(loader, 50))
    message = str(err.value)
    assert "mixed.tar" in message and "data.max_skip_rate" in message
    assert "\n" not in message and "Traceback" not in message


def test_a_source_with_fewer_shards_than_workers_does_not_hang(shards):
    batches = list(itertools.islice(_loader(shards, "good.tar", workers=2, streams=2), 4))
    assert [b.state["batches"] for b in batches] == [1, 2, 3, 4]


def test_only_bad_shards_stop_instead_of_spinning(shards):
    loader = _loader(shards, "zero.tar::empty.tar", max_skip_rate=0.5, skip_check_after=30)
    with pytest.raises(DataError, match="(zero|empty).tar"):
        next(iter(loader))
