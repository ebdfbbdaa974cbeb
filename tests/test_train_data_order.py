"""The data order through ``llip-train`` on 1, 2 and 4 ranks with different ``data.workers``:
every step's ``data/keys_digest`` in ``metrics.jsonl`` is the same, and equals the digest of the
global batch that the loaders give on one rank. The 2-rank run is stopped at step 2 and rerun
with ``data.workers=0``: the per-stream data state continues the same key sequence; its final
checkpoint's data states, read the way a resume reads them, continue it on 4 ranks too. A rerun
asking for other ``data.streams`` stops with one line.

Three runs start together (each spends most of its time starting up), then the reruns.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from _train_helpers import HANG_LIMIT_S, SMALL, metrics, run, start, tail, train_command, write_config
from shardgen import make_tokenizer, write_good_shards

from llip_scale.data import DataConfig, build_train_loader, keys_digest

pytestmark = pytest.mark.slow
STEPS, BATCH = 4, SMALL["batch_size"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("order")
    spec = write_good_shards(tmp / "shards", shards=4, per_shard=10)
    tok = make_tokenizer(tmp)
    data = {"source": "webdataset", "shards": spec, "tokenizer": tok.path, "shuffle_buffer": 4, "log_keys": True}
    config = write_config(tmp / "config.yaml", data=data, steps=STEPS, eval={"heldout_samples": 0},
                          checkpoint={"every": 2, "keep_last": 2}, logging={"every": 3, "tensorboard": False,
                                                                            "progress": "lines"})
    plans = {"one": (1, 0, STEPS), "two": (2, 2, 2), "four": (4, 1, STEPS)}  # ranks, workers, steps
    cmds = {name: train_command(config, [f"run_dir={tmp / name}", f"data.workers={workers}", f"steps={steps}"],
                                nproc=ranks) for name, (ranks, workers, steps) in plans.items()}
    procs = {name: start(cmd) for name, cmd in cmds.items()}
    out = {name: (proc.communicate(timeout=HANG_LIMIT_S)[0], proc.returncode) for name, proc in procs.items()}
    out["two_resumed"] = run(train_command(config, [f"run_dir={tmp / 'two'}", "data.workers=0", f"steps={STEPS}"],
                                           nproc=2))
    out["dir"], out["data"], out["tok"] = tmp, data, tok
    return out


def loader(runs, world: int = 1, rank: int = 0, workers: int = 0):
    """The runs' training loader of one rank, built directly."""
    data, tok = runs["data"], runs["tok"]
    cfg = DataConfig(shards=data["shards"], context_length=tok.context_length, workers=workers,
                     shuffle_buffer=data["shuffle_buffer"])
    return build_train_loader(cfg, batch_size=BATCH // world, rank=rank, world_size=world, image_size=16,
                              tokenizer=tok, seed=SMALL["seed"])


def expected_digests(runs) -> list[str]:
    """The digests of the first STEPS global batches, from the loader on one rank."""
    return [keys_digest(b.keys) for b in itertools.islice(iter(loader(runs)), STEPS)]


def digests(run_dir) -> list[str]:
    return [m["data/keys_digest"] for m in metrics(run_dir) if "data/keys_digest" in m]


def test_every_world_size_and_worker_count_sees_the_same_keys(runs):
    for name in ("one", "two", "four"):
        log, code = runs[name]
        assert code == 0, f"{name}: " + tail(log)
    expected = expected_digests(runs)
    assert len(set(expected)) == STEPS
    assert digests(runs["dir"] / "one") == expected
    assert digests(runs["dir"] / "four") == expected
    rows = metrics(runs["dir"] / "one")
    assert [m["step"] for m in rows] == [1, 2, 3, 4]  # a digest every step, loss lines every 3
    assert "train/loss" in rows[2] and "train/loss" not in rows[0]


def test_a_rerun_with_other_workers_continues_the_key_sequence(runs):
    again = runs["two_resumed"]
    assert again.returncode == 0, tail(again.stdout + again.stderr)
    assert "step_0000000002 (step 2)" in again.stderr
    assert digests(runs["dir"] / "two") == expected_digests(runs)
    final = runs["dir"] / "two" / "checkpoints" / "step_0000000004"
    states = [torch.load(final / f"train_state_rank{r:05d}.pt", weights_only=False)["train"]["data"] for r in (0, 1)]
    assert [[s["stream"] for s in st["stream_states"]] for st in states] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(st["batches"] == STEPS and st["streams"] == 8 for st in states)


def test_a_rerun_with_other_streams_stops_in_one_line(runs):
    """The checkpoint's data holds 8 streams (auto); a rerun asking for 4 cannot continue it."""
    config = runs["dir"] / "config.yaml"
    out = run(train_command(config, [f"run_dir={runs['dir'] / 'one'}", "data.streams=4", f"steps={STEPS + 2}"],
                            nproc=1))
    assert out.returncode == 2, tail(out.stdout + out.stderr)
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert errors == ["llip-train: config error: data state was saved with data.streams=8 but this run has "
                      "data.streams=4; resume with the same batch_size, data.streams, seeds and shards, or train "
                      "in a new run_dir"], out.stderr
    assert digests(runs["dir"] / "one") == expected_digests(runs)  # the run folder is as it was


def test_the_checkpoints_data_states_continue_on_four_ranks(runs):
    """What a resume on another world size does with the data: every rank reads all saved train
    states of the 2-rank checkpoint and takes its streams; the 4 ranks continue the keys."""
    from llip_scale.checkpoints.store import saved_data_states
    from llip_scale.data import reshard_state

    states = saved_data_states(str(runs["dir"] / "two"), STEPS)
    assert len(states) == 2
    keys = []
    for rank in range(4):
        four = loader(runs, world=4, rank=rank, workers=1)
        four.load_state_dict(reshard_state(states, rank, 4))
        keys += next(iter(four)).keys
    assert keys == next(itertools.islice(iter(loader(runs)), STEPS, None)).keys
