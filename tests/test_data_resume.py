"""Exact resume of the training loader: save after N batches, rebuild, the next M are identical.

Rank 0 or 1 of 2 ranks, 6 streams over the 12 samples of a global batch (2 per stream), so a
rank reads 3 streams: with 2 workers one worker runs two of them, the other one."""
from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from shardgen import make_tokenizer, write_good_shards

from llip_scale.config import ConfigError
from llip_scale.data import DataConfig, build_train_loader
from llip_scale.data import loader as loader_module
from llip_scale.data import stream as stream_module

BATCH, IMAGE, STREAMS = 6, 16, 6  # BATCH: per rank


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    spec = write_good_shards(root / "a", shards=4, per_shard=12)
    spec_b = write_good_shards(root / "b", shards=2, per_shard=7, start=1000)
    return spec + "::" + spec_b, make_tokenizer(root)


def _loader(data, workers: int, rank: int = 0, world_size: int = 2, seed: int = 7, streams: int = STREAMS,
            batch: int = BATCH):
    spec, tok = data
    cfg = DataConfig(shards=spec, weights=[2.0, 1.0], context_length=tok.context_length,
                     workers=workers, shuffle_buffer=4, prefetch=2, streams=streams)
    return build_train_loader(cfg, batch_size=batch, rank=rank, world_size=world_size,
                              image_size=IMAGE, tokenizer=tok, seed=seed)


def _take(loader, n: int) -> list:
    return list(itertools.islice(iter(loader), n))


def _same(a, b) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) and a.keys == b.keys


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("rank", [0, 1])
def test_resume_gives_the_next_batches_exactly(data, workers, rank):
    n, m = 5, 6
    full = _take(_loader(data, workers, rank), n + m)
    assert full[0].images.shape == (BATCH, 3, IMAGE, IMAGE) and full[0].images.dtype == torch.float32
    assert full[0].tokens.shape == (BATCH, data[1].context_length) and full[0].tokens.dtype == torch.int64
    assert len(full[0].keys) == BATCH and all(k.isdigit() for k in full[0].keys)  # the shards' __key__

    first = _loader(data, workers, rank)
    head = _take(first, n)
    assert head[-1].state == first.state_dict()
    assert all(_same(a, b) for a, b in zip(head, full))  # the run is deterministic
    saved = pickle.loads(pickle.dumps(head[-1].state))

    resumed = _loader(data, workers, rank)
    resumed.load_state_dict(saved)
    tail = _take(resumed, m)
    for k, (a, b) in enumerate(zip(tail, full[n:])):
        assert _same(a, b), f"batch {n + k} differs after resume"
        assert a.state == b.state and a.skipped == b.skipped


@pytest.mark.parametrize("saved_with, resumed_with", [(0, 1), (2, 0), (1, 2)])
def test_states_do_not_depend_on_the_number_of_workers(data, saved_with, resumed_with):
    """The state is per stream: a run saved with some data.workers resumes with any other."""
    full = _take(_loader(data, saved_with), 5)
    other = _loader(data, resumed_with)
    other.load_state_dict(full[1].state)
    assert all(_same(a, b) for a, b in zip(_take(other, 3), full[2:]))


def test_ranks_and_seeds_give_different_streams(data):
    r0, r1 = _take(_loader(data, 0, rank=0), 2), _take(_loader(data, 0, rank=1), 2)
    other_seed = _take(_loader(data, 0, rank=0, seed=8), 2)
    assert not _same(r0[0], r1[0]) and not _same(r0[0], other_seed[0])


def test_workers_share_the_streams_and_the_streams_differ(data):
    batches = _take(_loader(data, 2), 4)
    assert [b.state["batches"] for b in batches] == [1, 2, 3, 4]
    assert [st["stream"] for st in batches[-1].state["stream_states"]] == [0, 1, 2]  # rank 0's half of 6
    chunks = batches[0].images.split(BATCH // 3)  # one chunk per stream, in stream order
    assert not torch.equal(chunks[0], chunks[1]) and not torch.equal(chunks[1], chunks[2])


def test_resume_reads_only_the_current_shard(data, monkeypatch):
    loader = _loader(data, 0, streams=2)  # one stream per rank
    state = _take(loader, 9)[-1].state
    current = state["stream_states"][0]["shard"]
    assert current["consumed"] > 0

    opened: list[str] = []
    real_open = stream_module.open_shard

    def recording_open(url):
        opened.append(url)
        return real_open(url)

    monkeypatch.setattr(stream_module, "open_shard", recording_open)
    resumed = _loader(data, 0, streams=2)
    resumed.load_state_dict(state)
    _take(resumed, 1)
    assert opened[0] == current["url"]  # it reopens the shard it was in, not the stream start
    assert len(opened) <= 3  # that shard, then the ones the next batch draws from


def test_loading_a_state_from_another_setup_is_a_clear_error(data):
    state = _take(_loader(data, 2), 3)[-1].state
    for kwargs, word in ((dict(workers=2, world_size=3, batch=4), r"rank 0 of 3 reads streams \[0, 1\]"),
                         (dict(workers=2, rank=1), r"holds streams \[0, 1, 2\] but rank 1 of 2"),
                         (dict(workers=2, streams=3, world_size=3, batch=4), "data.streams=6 but this run has data.streams=3"),
                         (dict(workers=0, batch=3), "batch_size=12 but this run has batch_size=6"),
                         (dict(workers=0, seed=8), r"\(seed, data.seed\)=\[7, 0\] but this run has \[8, 0\]")):
        with pytest.raises(ConfigError, match=word) as err:
            _loader(data, **kwargs).load_state_dict(state)
        assert "\n" not in str(err.value)
    spec, tok = data
    other = build_train_loader(DataConfig(shards=spec, context_length=tok.context_length, streams=STREAMS),
                               batch_size=BATCH, rank=0, world_size=2, image_size=IMAGE, tokenizer=tok, seed=7)
    with pytest.raises(ConfigError, match="different data.shards or data.weights"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="version"):
        _loader(data, 2).load_state_dict({"streams": []})


def test_iterating_again_continues_where_the_last_loop_stopped(data):
    full = _take(_loader(data, 1), 6)
    loader = _loader(data, 1)
    first = _take(loader, 2)
    rest = _take(loader, 4)  # a new loop over the same loader (e.g. after an evaluation)
    assert all(_same(a, b) for a, b in zip(first + rest, full))


def test_iterating_leaves_the_global_rng_alone(data):
    """A checkpoint saves the global RNG state; starting the loader (as a resumed run does after
    restoring it) must not draw from it, or the resumed run's RNG runs one draw ahead."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    batches = iter(_loader(data, workers=1))
    next(batches)
    assert torch.equal(torch.get_rng_state(), before)


def test_workers_survive_the_stop_signals(data):
    """Slurm signals every process of a job step; the training process decides, so a worker must
    neither die of SIGTERM/USR1/USR2 nor break the batch order."""
    import os
    import signal
    from pathlib import Path

    def children() -> set[int]:
        me = os.getpid()
        return {int(p) for p in Path(f"/proc/{me}/task/{me}/children").read_text().split()}

    full = _take(_loader(data, 1), 6)
    others = children()
    batches = iter(_loader(data, workers=1))
    got = [next(batches)]
    workers = children() - others
    assert workers, "the loader started no worker process"
    for pid in workers:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            os.kill(pid, sig)
    got += [next(batches) for _ in range(5)]
    assert all(_same(a, b) for a, b in zip(got, full))


_LOADER_INIT = loader_module._init_worker


def _signal_self_first(worker_id: int) -> None:
    """A worker_init_fn that is hit by every stop signal before the loader's own init runs."""
    import os
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        os.kill(os.getpid(), sig)
    _LOADER_INIT(worker_id)


def test_workers_survive_stop_signals_that_arrive_before_their_init(data, monkeypatch):
    """A preemption can reach a worker between its fork and its worker_init_fn, where torch's
    worker loop has already set SIGTERM to die (and USR1/USR2 still kill): the signals must wait,
    blocked, until the worker ignores them."""
    full = _take(_loader(data, 2), 4)
    monkeypatch.setattr(loader_module, "_init_worker", _signal_self_first)
    assert all(_same(a, b) for a, b in zip(_take(_loader(data, 2), 4), full))


def test_stop_signals_blocked_delays_a_signal_without_losing_it():
    import signal
    import threading

    from llip_scale.dist.signals import stop_signals_blocked

    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        with stop_signals_blocked():
            # Directed at this thread: a process-directed kill() may be taken by any other thread
            # of the test process (torch's, a server's) that does not block it, at its own pace.
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            assert signal.SIGUSR1 in signal.sigpending()
            assert got == []
        assert got == [signal.SIGUSR1]
        assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.slow  # a process with two loader workers
def test_a_process_with_an_open_loader_exits(data, tmp_path):
    """Workers ignore SIGTERM, which multiprocessing sends to end them at interpreter exit: a
    process that exits with a loader still open must not wait for them forever."""
    import subprocess
    import sys

    from _train_helpers import HANG_LIMIT_S

    spec, tok = data
    script = tmp_path / "open_loader.py"
    script.write_text(f"""
from llip_scale.data import DataConfig, Tokenizer, build_train_loader
cfg = DataConfig(shards={spec!r}, workers=2, shuffle_buffer=4, prefetch=2, streams=2)
loader = build_train_loader(cfg, batch_size=6, rank=0, world_size=1, image_size=16,
                            tokenizer=Tokenizer({tok.path!r}, 16), seed=7)
batches = iter(loader)
next(batches)
print("one batch", flush=True)
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert out.returncode == 0 and "one batch" in out.stdout, out.stderr
    assert "Traceback" not in out.stderr and "killed by signal" not in out.stderr, out.stderr
