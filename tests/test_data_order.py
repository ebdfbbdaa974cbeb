"""The global batches depend on the data config, the seeds and the step only: not on the world
size, the per-rank batch or data.workers; a data state saved on W ranks resumes on W' ranks.

Loader level (no processes beyond the loader workers): the ranks of a world size are built one
after the other in this process, and global batch n is their batches n in rank order.
"""
from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from shardgen import make_tokenizer, write_good_shards

from llip_scale.config import ConfigError, load_config, local_batch_size
from llip_scale.data import DataConfig, build_train_loader, keys_digest, reshard_state
from llip_scale.data.config import stream_count

GLOBAL, IMAGE, STEPS = 16, 16, 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    spec = write_good_shards(root / "a", shards=5, per_shard=9)
    spec_b = write_good_shards(root / "b", shards=2, per_shard=7, start=1000)
    return spec + "::" + spec_b, make_tokenizer(root)


def _cfg(data, workers: int, streams: int = 0, seed: int = 0) -> DataConfig:
    spec, tok = data
    return DataConfig(shards=spec, weights=[2.0, 1.0], context_length=tok.context_length, workers=workers,
                      shuffle_buffer=4, prefetch=2, streams=streams, seed=seed)


def _loader(data, world: int, rank: int, workers: int, **cfg):
    return build_train_loader(_cfg(data, workers, **cfg), batch_size=GLOBAL // world, rank=rank, world_size=world,
                              image_size=IMAGE, tokenizer=data[1], seed=5)


def _run(data, world: int, workers: int, steps: int = STEPS, states=None, **cfg) -> tuple[list, list]:
    """(global batches as (keys, images, tokens), the last batch's state of each rank); ``states``:
    every rank's saved state from a run on any world size, resharded for this one."""
    per_rank, last = [], []
    for rank in range(world):
        loader = _loader(data, world, rank, workers, **cfg)
        if states is not None:
            loader.load_state_dict(reshard_state(pickle.loads(pickle.dumps(states)), rank, world))
        batches = list(itertools.islice(iter(loader), steps))
        per_rank.append(batches)
        last.append(batches[-1].state)
    merged = [([k for r in range(world) for k in per_rank[r][n].keys],
               torch.cat([per_rank[r][n].images for r in range(world)]),
               torch.cat([per_rank[r][n].tokens for r in range(world)])) for n in range(steps)]
    return merged, last


def _differences(a: list, b: list) -> list[int]:
    """The steps whose global batches differ in keys, images (crops) or tokens (captions)."""
    return [n for n, (x, y) in enumerate(zip(a, b, strict=True))
            if x[0] != y[0] or not torch.equal(x[1], y[1]) or not torch.equal(x[2], y[2])]


@pytest.fixture(scope="module")
def reference(data):
    return _run(data, 1, 0)[0]


@pytest.mark.parametrize("world, workers", [(1, 2), (2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2)])
def test_global_batches_do_not_depend_on_ranks_or_workers(data, reference, world, workers):
    got, _ = _run(data, world, workers)
    assert _differences(got, reference) == []


def test_the_default_streams_fit_every_world_size_up_to_8(data, reference):
    assert [stream_count(0, GLOBAL, w) for w in (1, 2, 4, 8)] == [8, 8, 8, 8]
    keys = reference[0][0]
    assert len(set(keys)) > GLOBAL // 2  # 8 streams, each with its own shard order and shuffle
    assert len({keys_digest(b[0]) for b in reference}) == STEPS  # every step new data


def test_seeds_and_streams_change_the_order(data, reference):
    assert _differences(_run(data, 1, 0, seed=1)[0], reference) == list(range(STEPS))
    assert _differences(_run(data, 1, 0, streams=4)[0], reference) == list(range(STEPS))


@pytest.mark.parametrize("saved_on, resumed_on", [((2, 1), (4, 2)), ((4, 2), (1, 0)), ((1, 0), (2, 2))])
def test_a_state_resumes_on_another_world_size_and_worker_count(data, reference, saved_on, resumed_on):
    """(world, workers) of the interrupted run and of the resumed one: the resumed run continues
    the same global batches."""
    n = 2
    head, states = _run(data, *saved_on, steps=n)
    tail, _ = _run(data, *resumed_on, steps=STEPS - n, states=states)
    assert _differences(head + tail, reference) == []


def test_an_auto_run_keeps_the_streams_it_started_with(data):
    """data.streams=0 resolves to 8 here; a state saved with 4 streams (e.g. by a run whose
    batch size was only divisible by 4) resumes with 4."""
    full, _ = _run(data, 1, 0, streams=4)
    _, states = _run(data, 2, 0, steps=2, streams=4)
    tail, last = _run(data, 2, 1, steps=STEPS - 2, states=states)
    assert _differences(full[2:], tail) == [] and last[0]["streams"] == 4


def test_resharding_refuses_states_that_do_not_fit_in_one_line(data):
    _, states = _run(data, 2, 0, steps=1)  # 8 streams, 4 per rank
    cases = [(states[:1], 2, "hold 4 of 8 streams; pass the state of every rank"),
             ([states[0], states[0]], 2, "stream 0 is in the saved data state of two ranks"),
             (states, 3, "holds 8 streams, which 3 ranks cannot share"),
             (states, 16, "holds 8 streams, which 16 ranks cannot share")]
    later = _run(data, 2, 0, steps=2)[1]
    cases.append(([states[0], later[1]], 2, "rank 1 differs from rank 0's in batches"))
    for saved, world, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            reshard_state(saved, 0, world)
        assert "\n" not in str(err.value)
    assert reshard_state([None, None], 1, 4) is None
    synthetic = {"next_batch": 3, "global_batch": 8}  # the same on every rank: passes through
    assert reshard_state([synthetic, dict(synthetic)], 3, 4) == synthetic


def test_streams_that_do_not_fit_are_config_errors_in_one_line(tmp_path):
    base = [f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=r"batch_size=12 is not a multiple of data.streams=8") as err:
        load_config(None, base + ["batch_size=12", "data.streams=8"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="data.streams must be >= 0"):
        load_config(None, base + ["data.streams=-1"])
    cfg = load_config(None, base + ["batch_size=24", "data.streams=8"])
    assert local_batch_size(cfg, 4) == 6
    with pytest.raises(ConfigError, match=r"data.streams=8 is not a multiple of the 3 ranks; .*divides 8"):
        local_batch_size(cfg, 3)
    assert stream_count(0, 24, 3) == 12 and stream_count(0, 4, 1) == 4 and stream_count(0, 6, 3) == 6


def test_keys_digest_is_order_sensitive():
    assert keys_digest(["a", "b"]) != keys_digest(["b", "a"])
    assert keys_digest(["ab", "c"]) != keys_digest(["a", "bc"])
    assert len(keys_digest([])) == 64 and int(keys_digest(["a"]), 16) >= 0
