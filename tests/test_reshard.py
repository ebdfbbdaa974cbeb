"""Resuming on another number of ranks (llip_scale.checkpoints.reshard, llip_scale.checkpoints.ds_compat).

Fast: the slice arithmetic, the batch split and its error, the per-rank rules (RNG, data
state), the layout classification. Slow (torchrun, 1-4 ranks, fp32 on the CPU): checkpoints of
ZeRO stage 0, 1, 2 and 3 written by 2 ranks (and stage 3 by 1 rank) are resumed on 1, 2 or 4 ranks
and saved again at once, without training: the second checkpoint must hold the first one's
fp32 master weights, Adam moments, step counts, scheduler and counters bit for bit, and so must
the engine as DeepSpeed's public getters read it. Then a ZeRO-3 run of 2 ranks is continued
from its step-3 checkpoint on 1 rank to step 6 and compared with the uninterrupted 2-rank run
(the data state is per stream, so the 1-rank run reads the same global batches).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import (
    HANG_LIMIT_S,
    PYTHON,
    REPO,
    differences,
    metrics,
    run,
    start,
    tail,
    train_command,
    weight_differences,
    write_config,
)

from llip_scale.checkpoints import ds_compat, reshard
from llip_scale.checkpoints.deepspeed_io import consolidated_state_dict
from llip_scale.checkpoints.store import read_marker
from llip_scale.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# fast: arithmetic and rules
# ---------------------------------------------------------------------------------------------


def zero3_split(full: torch.Tensor, world: int) -> list[torch.Tensor]:
    """The ZeRO-3 pieces of a flat parameter: ceil(n / world) each, the last ones padded (NaN)."""
    size = -(-full.numel() // world)
    padded = torch.full((size * world,), float("nan"))
    padded[:full.numel()] = full
    return list(padded.split(size))


@pytest.mark.parametrize("old_world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("new_world", [1, 2, 3, 4, 8])
def test_zero3_pieces_rebuild_every_new_piece_from_the_old_ones(old_world, new_world):
    for numel in [1, 2, 3, 5, 8, 13, 64, 65]:
        full = torch.arange(numel, dtype=torch.float32)
        old, new = zero3_split(full, old_world), zero3_split(full, new_world)
        for rank in range(new_world):
            start, count, size = reshard.zero3_piece(numel, new_world, rank)
            assert size == new[rank].numel()
            rebuilt = torch.full((size,), float("nan"))
            for old_rank, src, dst, n in reshard.zero3_pieces(numel, old_world, new_world, rank):
                assert not old[old_rank][src:src + n].isnan().any(), "read the old padding"
                rebuilt[dst:dst + n] = old[old_rank][src:src + n]
            assert torch.equal(rebuilt[:count], full[start:start + count]), (numel, rank)


def test_zero12_fragments_follow_each_other_in_rank_order():
    # a group of two parameters, "a" (5 elements) and "b" (4), flattened and split over 3 ranks of 3
    fragments = [{"a": (0, 3)}, {"a": (0, 2), "b": (2, 1)}, {"b": (0, 3)}]
    assert reshard._param_ranges(fragments) == {"a": [(0, 0, 0, 3), (1, 0, 3, 2)],
                                                "b": [(1, 2, 0, 1), (2, 0, 1, 3)]}


def test_batch_split_and_the_world_sizes_that_work():
    assert reshard.batch_split(32768, 16) == (2048, 1)
    assert reshard.batch_split(32768, 16, 64) == (64, 32)
    assert reshard.batch_split(64, 4, 8) == (8, 2)
    assert reshard.valid_world_sizes(12) == [1, 2, 3, 4, 6, 12]
    assert reshard.valid_world_sizes(64, 8) == [1, 2, 4, 8]
    with pytest.raises(ConfigError) as e:
        reshard.batch_split(8, 3)
    assert str(e.value) == ("batch_size=8 is not divisible by the 3 ranks; set batch_size to a multiple of 3, or run "
                            "on 1, 2, 4 or 8 ranks")
    with pytest.raises(ConfigError, match="x micro_batch_size=8; set batch_size to a multiple of 128, or run on "
                                          "1, 2, 4 or 8 ranks"):
        reshard.batch_split(64, 16, 8)


def test_an_impossible_world_size_fails_before_any_compute(tmp_path):
    config = write_config(tmp_path / "config.yaml")
    out = run([PYTHON, "-m", "llip_scale.train", str(config), f"run_dir={tmp_path / 'run'}", "--nproc", "3"])
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("llip-train: config error: batch_size=8 is not divisible by the 3 ranks; set "
                                  "batch_size to a multiple of 3, or run on 1, 2, 4 or 8 ranks")
    assert not (tmp_path / "run").exists()


def test_the_resume_line_says_what_changed():
    line = reshard.resumed_line(3000, 32, 16, (64, 1), (64, 2), 32768)
    assert line == "resumed step 3000 on 16 ranks (was 32): micro batch 64, accum 2 (was 1), global batch 32768 unchanged"
    assert reshard.resumed_line(3, 2, 1, (4, 1), (8, 1), 8) == \
        "resumed step 3 on 1 ranks (was 2): micro batch 8 (was 4), accum 1, global batch 8 unchanged"


def saved_states(world: int) -> reshard.SavedStates:
    reads = []

    def read(rank: int) -> dict:
        reads.append(rank)
        return {"train": {"step": 7, "updates": 7, "data": {"rank": rank}}, "rng": {"rank": rank}}
    states = reshard.SavedStates(read, world)
    states.reads = reads
    return states


def test_train_state_is_rank_0s_and_rng_carries_over_rank_by_rank():
    saved = saved_states(2)
    grown = [reshard.rank_state(saved, 4, r, seed=3) for r in range(4)]
    assert [s["train"]["step"] for s in grown] == [7] * 4
    assert [s["rng"] for s in grown[:2]] == [{"rank": 0}, {"rank": 1}]
    assert differences(grown[2]["rng"], reshard.fresh_rng(3, 2, 7)) == []
    assert differences(grown[2]["rng"], grown[3]["rng"]) != [], "new ranks draw the same numbers"
    assert differences(reshard.fresh_rng(3, 2, 7), reshard.fresh_rng(3, 2, 8)) != []
    # the data state is per stream: the loop maps all ranks' states (llip_scale.data.reshard_state)
    assert [s["train"]["data"] for s in grown] == [None] * 4
    assert saved_states(2)[1]["train"]["data"] == {"rank": 1}
    assert sorted(set(saved.reads)) == [0, 1], "read each saved file once"


def test_layouts_and_what_cannot_be_resharded():
    zero = ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    assert ds_compat.layout(["mp_rank_00_model_states.pt", "train_state_rank00000.pt"], 0) == "whole"
    assert ds_compat.layout(zero, 3) == "zero3"
    assert ds_compat.layout(["mp_rank_00_model_states.pt", zero[0]], 2) == "zero12"
    bf16 = ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert ds_compat.layout(bf16, 0) == "bf16"
    marker = {"world_size": 2, "zero_stage": 0, "files": dict.fromkeys(bf16, 1)}
    reshard.check_resumable(Path("ckpt"), marker, 2)
    with pytest.raises(reshard.ReshardError, match="resume only on the 2 ranks that wrote them"):
        reshard.check_resumable(Path("ckpt"), marker, 4)
    assert not reshard.needs_reshard({"world_size": 2, "zero_stage": 0, "files": {"mp_rank_00_model_states.pt": 1}}, 4)


# ---------------------------------------------------------------------------------------------
# slow: through torchrun
# ---------------------------------------------------------------------------------------------

STEP = "checkpoints/step_0000000003"
# (stage, ranks that wrote the checkpoint, ranks that resume it)
RESHARDS = [("0", 2, 1), ("0", 2, 4), ("1", 2, 1), ("1", 2, 4), ("2", 2, 1), ("3", 2, 1), ("3", 2, 4), ("3", 1, 2)]


def worker_command(config: Path, source: Path, target: Path, stage: str, nproc: int) -> list[str]:
    args = [str(REPO / "tests" / "_reshard_worker.py"), str(config), str(source), str(target),
            f"distributed.zero_stage={stage}"]
    if nproc == 1:
        return [PYTHON, *args]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", *args]


def run_jobs(jobs: dict, budget: int = 8) -> dict:
    """Run ``{name: (command, processes)}`` with at most ``budget`` processes at a time (each
    launch spends most of its time starting up); {name: {"log", "code"}}."""
    waiting, running, out = dict(jobs), {}, {}
    started = time.monotonic()
    while waiting or running:
        for name, (cmd, n) in list(waiting.items()):
            if not running or sum(jobs[r][1] for r in running) + n <= budget:
                running[name] = start(cmd)
                del waiting[name]
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                out[name] = {"log": proc.communicate()[0], "code": proc.returncode}
                del running[name]
        if time.monotonic() - started > HANG_LIMIT_S:
            for proc in running.values():
                proc.kill()
            raise AssertionError(f"{sorted(running, key=str)} still running after {HANG_LIMIT_S:.0f} s (hung?)")
        time.sleep(0.2)
    return out


def copy_checkpoint(source: Path, run_dir: Path) -> Path:
    return shutil.copytree(source, run_dir / STEP)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("reshard")
    config = write_config(tmp / "config.yaml", steps=6, checkpoint={"every": 3, "keep_last": 2},
                          logging={"every": 1, "tensorboard": False, "progress": "lines"}, data={"log_keys": True})
    trained = {f"a{s}": (s, 2) for s in "0123"} | {"s3": ("3", 1), "s0": ("0", 1)}
    out = run_jobs({name: (train_command(config, [f"run_dir={tmp / name}", f"distributed.zero_stage={stage}"], n), n)
                    for name, (stage, n) in trained.items()})
    for name, result in out.items():
        assert result["code"] == 0, f"{name}: " + tail(result["log"])
    # every checkpoint resumed is a step-3 one, alone in its run folder
    for name in trained:
        copy_checkpoint(tmp / name / STEP, tmp / f"src_{name}")
    jobs = {}
    for stage, old, new in RESHARDS:
        source = tmp / (f"src_a{stage}" if old == 2 else f"src_s{stage}")
        jobs[(stage, old, new)] = (worker_command(config, source, tmp / f"r{stage}_{old}to{new}", stage, new), new)
    out.update(run_jobs(jobs))
    # Runs continued on another number of ranks (one rank accumulating two micro-batches).
    continued = {}
    for name, (source, stage, world, micro) in CONTINUED.items():
        copy_checkpoint(tmp / source / STEP, tmp / name)
        overrides = [f"run_dir={tmp / name}", f"distributed.zero_stage={stage}", f"micro_batch_size={micro}"]
        continued[name] = (train_command(config, overrides, world), world)
    out.update(run_jobs(continued))
    out["dir"], out["config"] = tmp, config
    return out


def _model_states_differences(a: dict, b: dict) -> list[str]:
    """Everything but what names the world size (the DeepSpeed config holds the micro batch)."""
    skip = {"dp_world_size", "ds_config"}
    return differences({k: v for k, v in a.items() if k not in skip}, {k: v for k, v in b.items() if k not in skip})


@pytest.mark.slow
@pytest.mark.parametrize("stage,old,new", RESHARDS, ids=[f"zero{s}-{o}to{n}" for s, o, n in RESHARDS])
def test_a_resharded_resume_saves_the_same_state_bit_for_bit(runs, stage, old, new):
    result = runs[(stage, old, new)]
    assert result["code"] == 0, tail(result["log"])
    assert f"resumed step 3 on {new} ranks (was {old}): micro batch {8 // new} (was {8 // old})" in result["log"]
    a = runs["dir"] / (f"src_a{stage}" if old == 2 else f"src_s{stage}") / STEP
    b = runs["dir"] / f"r{stage}_{old}to{new}" / STEP
    assert read_marker(b)["world_size"] == new
    name = ds_compat.model_states_file(int(stage))
    assert _model_states_differences(torch.load(a / name, weights_only=False),
                                     torch.load(b / name, weights_only=False)) == []
    if stage != "0":  # stage 0 keeps the optimizer in the model states file, compared above
        (fa, sa, ca), (fb, sb, cb) = reshard.full_optimizer_state(a), reshard.full_optimizer_state(b)
        assert len(fa) == 42 and differences(fa, fb) == [] and differences(sa, sb) == []
        shared = set(ca) - {"partition_count", "param_slice_mappings", "group_paddings"}
        assert differences({k: ca[k] for k in shared}, {k: cb[k] for k in shared}) == []
        # DeepSpeed's own consolidation of the fp32 weights agrees
        assert differences(consolidated_state_dict(a), consolidated_state_dict(b)) == []
    train_a = torch.load(a / "train_state_rank00000.pt", weights_only=False)
    train_b = torch.load(b / "train_state_rank00000.pt", weights_only=False)
    assert differences({**train_a["train"], "data": None}, train_b["train"]) == []


@pytest.mark.slow
@pytest.mark.parametrize("source", ["src_a1", "src_a2", "src_a3", "src_s3"])
def test_the_partition_readers_agree_with_deepspeeds_own_consolidation(runs, source):
    """read_zero3_partition / read_zero12_partition / zero3_param_shapes against zero_to_fp32."""
    folder = runs["dir"] / source / STEP
    full, steps, common = reshard.full_optimizer_state(folder)
    weights = consolidated_state_dict(folder)
    assert differences({n: s["fp32"] for n, s in full.items()}, {n: w.flatten() for n, w in weights.items()}) == []
    assert [float(s) for s in steps] == [3.0, 3.0] and len(common["param_groups"]) == 2
    assert all(float(s["exp_avg_sq"].min()) >= 0 and float(s["exp_avg_sq"].max()) > 0 for s in full.values())


@pytest.mark.slow
@pytest.mark.parametrize("stage,old,new", RESHARDS, ids=[f"zero{s}-{o}to{n}" for s, o, n in RESHARDS])
def test_the_engine_holds_the_saved_state_after_a_resharded_resume(runs, stage, old, new):
    """Through DeepSpeed's public getters, not through our own files."""
    assert runs[(stage, old, new)]["code"] == 0
    a = runs["dir"] / (f"src_a{stage}" if old == 2 else f"src_s{stage}") / STEP
    seen = torch.load(runs["dir"] / f"r{stage}_{old}to{new}" / "probe.pt", weights_only=False)
    weights = consolidated_state_dict(a)
    assert differences(seen["module"], {n: w.reshape(seen["module"][n].shape) for n, w in weights.items()}) == []
    states = torch.load(a / ds_compat.model_states_file(int(stage)), weights_only=False)
    assert seen["lr"] == states["lr_scheduler"]["_last_lr"] and seen["global_steps"] == 3
    if stage == "0":
        return
    full, _, _ = reshard.full_optimizer_state(a)
    for key in ("fp32", *ds_compat.MOMENTS):
        assert differences({n: t.flatten() for n, t in seen[key].items()}, {n: s[key] for n, s in full.items()}) == []
    numel = {n: s["fp32"].numel() for n, s in full.items()}
    if stage == "3":  # rank 0's pieces: ceil(numel / new) each
        assert [size for group in seen["layout"] for _, size in group] == \
            [-(-numel[n] // new) for group in seen["layout"] for n, _ in group]
    else:  # rank 0's fragments lie inside their parameters and inside its partition
        for size, held in seen["layout"]:
            assert held and all(0 <= lp and lp + n <= numel[name] and hp + n <= size for name, lp, hp, n in held)
        if new == 1:  # one rank holds every parameter whole
            assert sorted((name, lp, n) for _, held in seen["layout"] for name, lp, _, n in held) == \
                sorted((name, 0, n) for name, n in numel.items())


@pytest.mark.slow
def test_rng_states_carry_over_to_the_same_ranks_and_new_ranks_get_fresh_ones(runs):
    a, b = runs["dir"] / "src_a3" / STEP, runs["dir"] / "r3_2to4" / STEP
    for rank in range(4):
        rng = torch.load(b / f"train_state_rank{rank:05d}.pt", weights_only=False)["rng"]
        expected = torch.load(a / f"train_state_rank{rank:05d}.pt", weights_only=False)["rng"] if rank < 2 \
            else reshard.fresh_rng(3, rank, 3)
        assert differences(rng, expected) == [], rank


# name: (the run whose step-3 checkpoint it continues, ZeRO stage, ranks, micro batch); each is
# compared with that run's own uninterrupted steps 4-6.
CONTINUED = {"a3_on_1": ("a3", 3, 1, 4), "a0_on_1": ("a0", 0, 1, 4), "s3_on_2": ("s3", 3, 2, 4),
             "s0_on_2": ("s0", 0, 2, 4)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONTINUED))
def test_a_run_continued_on_another_number_of_ranks_matches_the_uninterrupted_run(runs, name):
    reference, _, world, micro = CONTINUED[name]
    old = 1 if reference.startswith("s") else 2
    assert runs[name]["code"] == 0, tail(runs[name]["log"])
    accum = 8 // (world * micro)
    assert f"resumed step 3 on {world} ranks (was {old}): micro batch {micro}" in runs[name]["log"], runs[name]["log"]
    assert f"accum {accum}" in runs[name]["log"]
    losses = {run: {m["step"]: m["train/loss"] for m in metrics(runs["dir"] / run) if "train/loss" in m}
              for run in (name, reference)}
    assert sorted(losses[name]) == [4, 5, 6]
    # the same samples in the same order (synthetic sample keys, digested per global batch)
    digests = {run: {m["step"]: m["data/keys_digest"] for m in metrics(runs["dir"] / name) if "data/keys_digest" in m}
               for run in (name, reference)}
    assert digests[name] == {s: digests[reference][s] for s in (4, 5, 6)}
    for step in (4, 5, 6):
        got, want = losses[name][step], losses[reference][step]
        assert abs(got - want) <= 1e-5 * abs(want), (step, got, want)
    # One rank sums the batch in another order than two ranks (whose all-reduce adds two halves),
    # and an accumulating rank in micro-batches: gradients differ in their last bits (relative
    # ~1e-7), and a smooth update carries that into weights that agree to far below 1e-6 of the
    # largest weight (see weight_differences for the one exception, attention's key bias).
    final = "checkpoints/step_0000000006"
    got, want = consolidated_state_dict(runs["dir"] / name / final), consolidated_state_dict(runs["dir"] / reference / final)
    assert weight_differences(got, want, lr=2e-3, steps=3) == []
    # the step-3 weights were not simply kept: training went on
    start_ = consolidated_state_dict(runs["dir"] / reference / STEP)
    assert max(float((got[n] - start_[n]).detach().abs().max()) for n in want) > 1e-4
    assert np.isfinite(list(losses[name].values())).all()
