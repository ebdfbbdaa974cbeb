"""Shards read from an object store: a local S3 server (moto) behind a proxy that injects faults.

Every batch read through faults (connections cut inside a body, HTTP 503, stalls past the read
timeout) is the batch of a fault-free run; a resume inside a shard fetches only the bytes after
its saved offset; permanent errors and a missing boto3 are one line each."""
from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch
from _train_helpers import wait_for
from faultproxy import FaultProxy
from shardgen import make_tokenizer, write_good_shards

from llip_scale.config import ConfigError
from llip_scale.data import DataConfig, DataError, build_train_loader, check_sources, keys_digest, objects
from llip_scale.data.shards import parse_sources

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

BUCKET, SHARDS, PER_SHARD = "llip-test", 4, 12
SPEC = f"s3://{BUCKET}/train/shard-{{000000..{SHARDS - 1:06d}}}.tar"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with the test shards, and the fault proxy in front of it."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(endpoint + "/moto-api/"), "the moto server to answer",
                 lambda: proc.poll() is not None, poll_s=0.1)
        root = tmp_path_factory.mktemp("s3shards")
        write_good_shards(root / "train", shards=SHARDS, per_shard=PER_SHARD)
        write_good_shards(root / "local", shards=2, per_shard=7, start=1000)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=BUCKET)
        for path in sorted((root / "train").glob("*.tar")):
            s3.upload_file(str(path), BUCKET, f"train/{path.name}")
        proxy = FaultProxy(endpoint)
        yield {"endpoint": endpoint, "proxy": proxy, "root": root, "tok": make_tokenizer(root)}
        proxy.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def s3(server, monkeypatch, tmp_path):
    """Credentials and the endpoint (the proxy) for this test only; fresh clients, no faults."""
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", server["proxy"].url)
    monkeypatch.setattr(objects, "_clients", {})
    server["proxy"].reset()
    return server


def _loader(server, shards: str, *, workers: int = 0, weights=(), **options):
    tok = server["tok"]
    cfg = DataConfig(shards=shards, weights=list(weights), context_length=tok.context_length,
                     workers=workers, shuffle_buffer=options.pop("shuffle_buffer", 5), streams=2,
                     s3_backoff=0.01, s3_timeout=options.pop("s3_timeout", 10.0), **options)
    cfg.validate("data")
    return build_train_loader(cfg, batch_size=4, rank=0, world_size=1, image_size=8, tokenizer=tok, seed=3)


def _take(loader, n: int) -> list:
    return list(itertools.islice(iter(loader), n))


def _local_spec(server) -> str:
    return str(server["root"] / "train" / f"shard-{{000000..{SHARDS - 1:06d}}}.tar")


def _same(a: list, b: list) -> bool:
    return all(x.keys == y.keys and torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens)
               for x, y in zip(a, b)) and len(a) == len(b)


@pytest.fixture(scope="module")
def reference(server):
    """The batches of the local copy of the shards."""
    return _take(_loader(server, _local_spec(server)), 30)


@pytest.mark.parametrize("workers", [0, 1])
def test_s3_shards_give_the_batches_of_the_local_copy(s3, reference, workers):
    check_sources(DataConfig(shards=SPEC))
    batches = _take(_loader(s3, SPEC, workers=workers), 30)  # 2.5 passes over the shards
    assert _same(batches, reference)
    assert batches[-1].retries == {} and batches[-1].skipped == {}


@pytest.mark.parametrize("prefetch_bytes", [64 << 20, 0])
def test_faults_are_retried_at_the_same_byte_and_change_nothing(s3, reference, prefetch_bytes, caplog):
    proxy = s3["proxy"]
    proxy.latency = 0.01
    proxy.plan("shard-000000.tar", "cut:3000", "cut:700", "503")  # three faults in one shard
    proxy.plan("shard-000002.tar", "slowdown", "cut:9000")
    proxy.plan("shard-000003.tar", "500")
    with caplog.at_level(logging.INFO, logger="llip_scale.data"):
        batches = _take(_loader(s3, SPEC, prefetch_bytes=prefetch_bytes), 30)
    assert [b.keys for b in batches] == [b.keys for b in reference]
    assert keys_digest([k for b in batches for k in b.keys]) == keys_digest([k for b in reference for k in b.keys])
    assert _same(batches, reference)
    assert batches[-1].retries == {"cut": 3, "http_500": 1, "http_503": 1, "slow_down": 1}
    assert batches[-1].skipped == {}
    assert "retry 1" in caplog.text and "shard-000000.tar" in caplog.text
    # Each retry continues at the byte it stopped at (the two streams may share the planned faults).
    ranged = [r for m, p, r, _ in proxy.requests if p.endswith("shard-000000.tar") and r]
    assert ranged and set(ranged) <= {"bytes=3000-", "bytes=700-", "bytes=3700-"}


def test_a_stall_past_the_read_timeout_is_retried(s3, reference):
    s3["proxy"].plan("shard-000001.tar", "stall:2")
    batches = _take(_loader(s3, SPEC, s3_timeout=0.5), 12)
    assert _same(batches, reference[:12])
    assert batches[-1].retries == {"timeout": 1}


def test_a_resume_inside_a_shard_reads_only_the_bytes_after_its_offset(s3):
    proxy = s3["proxy"]
    full = _take(_loader(s3, SPEC, shuffle_buffer=2, prefetch_bytes=0), 8)
    state = full[4].state
    shard = state["stream_states"][0]["shard"]
    assert shard["offset"] > 0 and shard["first"] > 0  # mid-shard, past its first sample
    size = boto3.client("s3").head_object(Bucket=BUCKET, Key=shard["url"].split("/", 3)[3])["ContentLength"]

    proxy.reset()
    resumed = _loader(s3, SPEC, shuffle_buffer=2, prefetch_bytes=0)
    resumed.load_state_dict(state)
    after = _take(resumed, 3)
    assert _same(after, full[5:8])
    path = "/" + shard["url"][len("s3://"):]
    method, _, ranged, served = next(r for r in proxy.requests if r[0] == "GET" and r[1] == path)
    assert ranged == f"bytes={shard['offset']}-"
    assert served == size - shard["offset"]  # nothing before the offset was fetched

    with_prefetch = _loader(s3, SPEC, shuffle_buffer=2)
    with_prefetch.load_state_dict(state)
    assert _same(_take(with_prefetch, 3), full[5:8])


def test_old_states_without_an_offset_replay_the_shard(s3):
    full = _take(_loader(s3, SPEC, shuffle_buffer=2), 6)
    state = full[2].state
    for st in state["stream_states"]:
        for key in ("first", "offset"):
            st["shard"].pop(key, None)
        st.pop("retries")
    resumed = _loader(s3, SPEC, shuffle_buffer=2)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 3), full[3:6])


def test_missing_and_forbidden_objects_are_one_line_each(s3):
    missing_key = f"s3://{BUCKET}/train/nope-{{0..1}}.tar"
    missing_bucket = "s3://no-such-bucket-llip/shard-{0..1}.tar"
    for spec, what in [(missing_key, "404"), (missing_bucket, "404")]:
        with pytest.raises(ConfigError) as err:
            check_sources(DataConfig(shards=spec))
        message = str(err.value)
        assert what in message and parse_sources(spec)[0].urls[0] in message and "\n" not in message
    s3["proxy"].forbidden.add("shard-000000.tar")
    with pytest.raises(ConfigError, match=r"shard-000000.tar: 403 ") as err:
        check_sources(DataConfig(shards=SPEC))
    assert "\n" not in str(err.value)


def test_a_forbidden_shard_is_skipped_and_counted(s3, caplog):
    s3["proxy"].forbidden.add("shard-000001.tar")
    with caplog.at_level(logging.WARNING, logger="llip_scale.data"):
        batches = _take(_loader(s3, SPEC, max_skip_rate=0.5), 12)
    assert batches[-1].skipped.get("unreadable_shard", 0) >= 1
    assert f"s3://{BUCKET}/train/shard-000001.tar: 403 AccessDenied" in caplog.text
    assert all(not k.startswith(f"{PER_SHARD:09d}") for b in batches for k in b.keys)


def test_when_every_shard_fails_the_run_stops_with_one_line(s3):
    spec = f"s3://{BUCKET}/train/missing-{{0..3}}.tar"
    loader = _loader(s3, spec, max_skip_rate=0.5, skip_check_after=20)
    with pytest.raises(DataError) as err:
        _take(loader, 1)
    message = str(err.value)
    assert "\n" not in message and "missing-" in message and "404" in message


def test_s3_and_local_sources_mix_by_weight(s3):
    local = str(s3["root"] / "local" / "shard-{000000..000001}.tar")
    mixed = _take(_loader(s3, f"{SPEC}::{local}", weights=[1.0, 3.0]), 12)
    all_local = _take(_loader(s3, f"{_local_spec(s3)}::{local}", weights=[1.0, 3.0]), 12)
    assert _same(mixed, all_local)
    keys = [int(k) for b in mixed for k in b.keys]
    assert any(k >= 1000 for k in keys) and any(k < 1000 for k in keys)


def test_a_missing_boto3_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 raises ImportError
    for make in (lambda: parse_sources(SPEC), lambda: DataConfig(shards=SPEC).validate("data")):
        with pytest.raises(ConfigError, match=r"pip install llip_scale\[s3\]") as err:
            make()
        assert "\n" not in str(err.value)


def test_gs_urls_use_the_gcs_xml_endpoint(s3):
    client = objects._make_client("gs", 5.0)
    assert client.meta.endpoint_url == objects.GCS_ENDPOINT
    assert objects.split_url("gs://bucket/a/b.tar") == ("gs", "bucket", "a/b.tar")
    assert parse_sources("gs://b/s-{0..2}.tar")[0].urls == ("gs://b/s-0.tar", "gs://b/s-1.tar", "gs://b/s-2.tar")


def test_prefetch_bytes_is_validated():
    with pytest.raises(ConfigError, match="prefetch_bytes"):
        DataConfig(prefetch_bytes=-1).validate("data")
    with pytest.raises(ConfigError, match="s3_retries"):
        DataConfig(s3_retries=-1).validate("data")


@pytest.mark.slow  # two short training runs
def test_training_from_s3_through_faults_matches_the_local_copy(s3, tmp_path):
    """llip-train on s3:// shards with faults injected: the same global batches (key digests)
    and losses as the run on the local copy, and the retries in the run's metrics."""
    from _train_helpers import metrics, run, tail, train_command, write_config

    proxy = s3["proxy"]
    proxy.plan("shard-000000.tar", "cut:2500", "503")
    proxy.plan("shard-000001.tar", "cut:6000")
    losses, digests, retries = {}, {}, {}
    for name, shards in (("s3", SPEC), ("local", _local_spec(s3))):
        config = write_config(tmp_path / f"{name}.yaml", steps=4,
                              data={"source": "webdataset", "shards": shards, "tokenizer": s3["tok"].path,
                                    "workers": 1, "shuffle_buffer": 5, "streams": 2, "log_keys": True,
                                    "s3_backoff": 0.01},
                              eval={"heldout_samples": 0})
        out = run(train_command(config, [f"run_dir={tmp_path / name}"], nproc=1))
        assert out.returncode == 0, tail(out.stdout + out.stderr)
        rows = metrics(tmp_path / name)
        losses[name] = [m["train/loss"] for m in rows if "train/loss" in m]
        digests[name] = [m["data/keys_digest"] for m in rows if "data/keys_digest" in m]
        retries[name] = {k: v for k, v in rows[-1].items() if k.startswith("data/retries/")}
    assert len(digests["s3"]) == 4 and digests["s3"] == digests["local"]
    assert losses["s3"] == losses["local"]
    assert retries["local"] == {}
    assert retries["s3"].get("data/retries/cut", 0) >= 1, retries["s3"]


def test_prefetch_holds_at_most_its_byte_bound(s3):
    """The background read of a 1 MiB object with data.prefetch_bytes=64 KiB never holds more
    than the bound plus one read, and the consumer gets the object's bytes unchanged."""
    limit = 64 << 10
    body = os.urandom(1 << 20)
    boto3.client("s3").put_object(Bucket=BUCKET, Key="big/object.tar", Body=body)
    prefetcher = objects.Prefetcher(objects.ObjectOptions(backoff=0.01, prefetch_bytes=limit), objects.RetryCounts())
    try:
        reader = prefetcher.open(0, f"s3://{BUCKET}/big/object.tar", 0, [])
        wait_for(lambda: prefetcher.held >= limit, "the read-ahead", poll_s=0.01)  # before anything is consumed
        got, most = [], 0
        while True:
            most = max(most, prefetcher.held)
            piece = reader.read1(4096)  # small reads: the reader keeps up with the consumer
            if not piece:
                break
            got.append(piece)
        reader.close()
    finally:
        prefetcher.close()
    assert b"".join(got) == body
    assert limit <= most <= 2 * limit, most
