"""Shard specs (braces, sources, weights, pipe:), source checks, shard order, the tar reader."""
from __future__ import annotations

import collections
import gzip
import io
import itertools
import tarfile

import pytest
from _train_helpers import wait_for
from shardgen import good_members, make_tokenizer, write_good_shards

from llip_scale.config import ConfigError, load_config
from llip_scale.data import DataConfig, build_train_loader, check_sources
from llip_scale.data.shards import ShardOpenError, ShardSampler, expand_braces, open_shard, parse_sources
from llip_scale.data.tario import TarError, iter_members, iter_samples


def test_brace_expansion():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x{1..2}") == ["a/x1", "a/x2", "b/x1", "b/x2"]
    assert expand_braces("{9..11}") == ["9", "10", "11"]
    assert expand_braces("p{a,{0..1}}q") == ["paq", "p0q", "p1q"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces("s-{0..3.tar")


def test_sources_weights_default_to_shard_counts(tmp_path):
    a = write_good_shards(tmp_path / "a", shards=3, per_shard=2)
    sources = parse_sources(f"{a}::{tmp_path / 'a'}")  # a brace spec and a folder
    assert [len(s.urls) for s in sources] == [3, 3] and [s.weight for s in sources] == [3.0, 3.0]
    assert sources[0].urls == sources[1].urls
    assert [s.weight for s in parse_sources(f"{a}::{a}", [1, 4])] == [1.0, 4.0]


def test_check_sources_names_the_missing_or_empty_source(tmp_path):
    good = write_good_shards(tmp_path / "a", shards=2, per_shard=2)
    check_sources(DataConfig(shards=good))
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "e-0.tar").write_bytes(b"")
    cases = [
        ("", "data.shards is empty"),
        (f"{good}::{tmp_path}/missing-{{0..3}}.tar", r"data source 2 .*4 of 4 shard\(s\) do not exist"),
        (f"{tmp_path}/z/e-{{0..0}}.tar", "every shard is empty"),
        (str(tmp_path / "z" / "nothing_here"), "do not exist"),
        (str(tmp_path / "empty_folder_that_exists"), "matches no shards"),
        ("pipe:no-such-program-xyz {0..1}", "command 'no-such-program-xyz' not found"),
    ]
    (tmp_path / "empty_folder_that_exists").mkdir()
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_sources(DataConfig(shards=spec))
    with pytest.raises(ConfigError, match="one weight per source"):
        check_sources(DataConfig(shards=f"{good}::{good}", weights=[1.0]))
    with pytest.raises(ConfigError, match="names no shards"):  # the loader refuses too
        build_train_loader(DataConfig(shards=str(tmp_path / "empty_folder_that_exists"),
                                      context_length=16), batch_size=2, rank=0, world_size=1,
                           image_size=8, tokenizer=make_tokenizer(tmp_path), seed=0)


def test_config_validation_and_overrides():
    cfg = load_config(None, ["data.weights=[1, 3]", "data.shards=a.tar::b.tar", "data.workers=0"])
    assert cfg.data.weights == [1.0, 3.0]
    for override, message in (("data.max_skip_rate=1.0", "max_skip_rate"),
                              ("data.crop_scale=[0.5, 1.5]", "crop_scale"),
                              ("data.weights=[1, 2, 3]", "one weight per source")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["data.shards=a.tar::b.tar", override])


def test_shard_order_is_a_resumable_function_of_the_state(tmp_path):
    a = write_good_shards(tmp_path / "a", shards=5, per_shard=1)
    b = write_good_shards(tmp_path / "b", shards=2, per_shard=1)
    sources = parse_sources(f"{a}::{b}", [1.0, 3.0])
    sampler = ShardSampler(sources, [1, 2, 0, 0])
    order = [sampler.next()[1] for _ in range(400)]
    resumed = ShardSampler(sources, [1, 2, 0, 0])
    [resumed.next() for _ in range(123)]
    again = ShardSampler(sources, [1, 2, 0, 0], resumed.state_dict())
    assert [again.next()[1] for _ in range(400 - 123)] == order[123:]
    counts = collections.Counter(u in sources[1].urls for u in order)
    assert 250 < counts[True] < 350  # weight 3 of 4
    a_order = [u for u in order if u in sources[0].urls]
    for p in range(0, 10, 5):  # every pass over a source visits each of its shards once
        assert sorted(a_order[p:p + 5]) == sorted(sources[0].urls)
    other = ShardSampler(sources, [1, 2, 0, 1])
    assert [other.next()[1] for _ in range(20)] != order[:20]


def test_pipe_sources_stream_through_the_loader(tmp_path):
    spec = write_good_shards(tmp_path / "a", shards=2, per_shard=6)
    tok = make_tokenizer(tmp_path)
    cfg = DataConfig(shards=f"pipe:cat {spec}", context_length=tok.context_length, workers=0)
    check_sources(cfg)
    loader = build_train_loader(cfg, batch_size=4, rank=0, world_size=1, image_size=8,
                                tokenizer=tok, seed=0)
    batches = list(itertools.islice(loader, 6))
    assert batches[-1].skipped == {}
    assert all(tok.decode(t).startswith("good") for b in batches for t in b.tokens)


def _tar_bytes(members, fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_reader_reads_long_names_pax_and_gzip():
    long_dir = "d" * 120
    members = [(f"{long_dir}/000001.jpg", b"img"), (f"{long_dir}/000001.txt", b"cap"),
               ("000002.json", b"{}")]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        raw = _tar_bytes(members, fmt)
        assert list(iter_members(io.BufferedReader(io.BytesIO(raw)))) == members
        gz = io.BufferedReader(io.BytesIO(gzip.compress(raw)))
        samples = list(iter_samples(gz))
        assert [s["__key__"] for s in samples] == [f"{long_dir}/000001", "000002"]
        assert samples[0]["txt"] == b"cap"


def test_every_cut_short_archive_is_reported_as_truncated(tmp_path):
    raw = _tar_bytes([m for i in range(2) for m in good_members(i)])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        end = tf.getmembers()[-1].offset_data + 512  # start of the end-of-archive block
    assert len(list(iter_samples(io.BufferedReader(io.BytesIO(raw))))) == 2
    for cut in list(range(1, end, 97)) + [512, end - 1]:  # python's tarfile misses most of these
        with pytest.raises(TarError) as err:
            list(iter_members(io.BufferedReader(io.BytesIO(raw[:cut]))))
        assert err.value.reason == "truncated_tar", cut
    for garbage in (b"x" * 2048, b"\x01" * 600):
        with pytest.raises(TarError, match="not a tar file") as err:
            list(iter_members(io.BufferedReader(io.BytesIO(garbage))))
        assert err.value.reason == "bad_tar"


def test_a_pipe_closed_early_leaves_no_broken_pipe_noise(tmp_path, capfd):
    spec = write_good_shards(tmp_path / "a", shards=1, per_shard=3)
    done = tmp_path / "writer.done"
    # A writer that ignores SIGPIPE (as Python programs such as the aws CLI do) gets EPIPE once
    # the reader stops, and says so on stderr; it runs in the background of the shell, so it
    # outlives the shell if the shell is killed, and marks its end.
    command = f"trap '' PIPE; (cat {spec}; yes padding; touch {done}) & wait"
    with open_shard(f"pipe:{command}") as f:
        keys = [s["__key__"] for s in iter_samples(f)]
    assert len(keys) == 3
    wait_for(done.exists, "the writer to end")  # let it say what it has to say
    err = capfd.readouterr().err
    assert "Broken pipe" not in err and "BrokenPipe" not in err


def test_a_failing_pipe_command_names_its_error():
    with pytest.raises(ShardOpenError, match=r"status 3: no such shard here"):
        with open_shard("pipe:echo 'no such shard here' >&2; exit 3"):
            pass
