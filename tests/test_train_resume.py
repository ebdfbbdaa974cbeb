"""Exact resume through the real entry point (torchrun, 2 ranks, gloo, fp32 on the CPU).

For ZeRO stage 0 and 3, an uninterrupted run of 8 steps is compared with a run that is
interrupted and continued by rerunning the same command: every saved state of the final
checkpoint (parameters, optimizer state, scheduler, per-rank data and RNG states) must be
identical bit for bit.

* Stage 0: one rank gets SIGUSR1 (preemption); all ranks agree to stop at the next step
  boundary, save, and exit 75.
* Stage 3: every process is SIGKILLed as soon as the step-4 checkpoint is complete; before the
  rerun, three broken newer checkpoints are planted (no marker, one flipped byte in a model
  states file of the same size, an unreadable train state under a marker without checksums as
  older versions wrote): each must be skipped with a warning saying why.

The final checkpoints of both stages then have one byte flipped in each of their files in turn:
every flip must be caught, by the checks a resume runs and by ``llip-train --verify-checkpoint``.

The four first runs go concurrently, then the two reruns: each launch spends most of its time
starting up.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest
from _train_helpers import (
    HANG_LIMIT_S,
    PYTHON,
    checkpoint_differences,
    metrics,
    newest_complete,
    run,
    start,
    tail,
    train_command,
    write_config,
)

from llip_scale.checkpoints.store import MARKER, export, problems

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers in Linux /proc")]
FINAL = "checkpoints/step_0000000008"


def worker_pids(proc) -> list[int]:
    """The training processes torchrun started (its children)."""
    path = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def kill_all(proc, workers: list[int]) -> None:
    for pid in [*workers, proc.pid]:  # torchrun starts its workers in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def interrupt(procs: dict, tmp: Path, timeout: float = HANG_LIMIT_S) -> None:
    """Signal one rank of b0 after its first step; SIGKILL b3 once its step-4 checkpoint is done."""
    marker = tmp / "b3" / FINAL.replace("8", "4") / "complete.json"
    b3_workers: list[int] = []
    signalled = killed = False
    deadline = time.monotonic() + timeout
    while not (signalled and killed):
        if len(b3_workers) < 2:
            b3_workers = worker_pids(procs["b3"])
        if not signalled and metrics(tmp / "b0"):
            os.kill(worker_pids(procs["b0"])[0], signal.SIGUSR1)  # only one rank hears it
            signalled = True
        if not killed and marker.is_file():
            kill_all(procs["b3"], b3_workers)
            killed = True
        ended = [name for name, done in (("b0", signalled), ("b3", killed)) if not done and procs[name].poll() is not None]
        if ended or time.monotonic() > deadline:
            for proc in procs.values():
                kill_all(proc, worker_pids(proc))
            raise AssertionError(f"runs {ended} ended (or timed out) before being interrupted: "
                                 + "\n".join(tail(procs[n].communicate()[0]) for n in ended))
        time.sleep(0.005)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def plant_broken_checkpoints(root: Path) -> None:
    """Newer than step 4, each unusable in its own way."""
    good = root / "step_0000000004"
    no_marker = shutil.copytree(good, root / "step_0000000005")
    (no_marker / MARKER).unlink()
    garbled = shutil.copytree(good, root / "step_0000000006")
    state = garbled / "train_state_rank00001.pt"
    state.write_bytes(b"\0" * state.stat().st_size)
    marker = json.loads((garbled / MARKER).read_text())
    (garbled / MARKER).write_text(json.dumps({k: marker[k] for k in ("step", "world_size", "files")}))
    flipped = shutil.copytree(good, root / "step_0000000007")
    states = flipped / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    flip_byte(states, states.stat().st_size // 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("resume")
    config = write_config(tmp / "config.yaml")
    cmds = {name: train_command(config, [f"run_dir={tmp / name}", f"distributed.zero_stage={name[1]}"])
            for name in ("a0", "b0", "a3", "b3")}
    procs = {name: start(cmd) for name, cmd in cmds.items()}
    interrupt(procs, tmp)
    out = {name: {"log": proc.communicate(timeout=HANG_LIMIT_S)[0], "code": proc.returncode}
           for name, proc in procs.items()}
    out["stopped0"], out["killed3"] = newest_complete(tmp / "b0"), newest_complete(tmp / "b3")
    plant_broken_checkpoints(tmp / "b3" / "checkpoints")
    again = {name: start(cmds[name]) for name in ("b0", "b3")}  # the same commands, rerun
    for name, proc in again.items():
        out[f"{name}_resumed"] = {"log": proc.communicate(timeout=HANG_LIMIT_S)[0], "code": proc.returncode}
    out["dir"] = tmp
    return out


def test_uninterrupted_runs_finish(runs):
    for name in ("a0", "a3"):
        assert runs[name]["code"] == 0, tail(runs[name]["log"])


def test_stage0_preempted_run_resumes_bit_for_bit(runs):
    first, second = runs["b0"], runs["b0_resumed"]
    assert first["code"] != 0, "a preempted run must not report success"
    assert "stopped by SIGUSR1" in first["log"], tail(first["log"])
    assert runs["stopped0"] is not None and 1 <= runs["stopped0"] < 8, f"saved at step {runs['stopped0']}"
    assert second["code"] == 0, tail(second["log"])
    assert f"(step {runs['stopped0']})" in second["log"]
    assert checkpoint_differences(runs["dir"] / "a0" / FINAL, runs["dir"] / "b0" / FINAL) == []


def test_stage0_metrics_describe_one_run(runs):
    steps = [m["step"] for m in metrics(runs["dir"] / "b0") if "train/loss" in m]
    assert steps == list(range(1, 9))
    assert list((runs["dir"] / "b0" / "tensorboard").glob("events.out.tfevents.*"))


def test_stage3_killed_run_resumes_bit_for_bit(runs):
    first, second = runs["b3"], runs["b3_resumed"]
    assert first["code"] == -signal.SIGKILL
    assert runs["killed3"] == 4, "the run was not killed between its step-4 and step-8 checkpoints"
    assert second["code"] == 0, tail(second["log"])
    assert "resumed from" in second["log"] and "step_0000000004 (step 4)" in second["log"]
    assert checkpoint_differences(runs["dir"] / "a3" / FINAL, runs["dir"] / "b3" / FINAL) == []


def test_stage3_broken_checkpoints_are_skipped_with_the_reason(runs):
    log = runs["b3_resumed"]["log"]
    assert "step_0000000007: zero_pp_rank_1_mp_rank_00_model_states.pt does not match its checksum" in log, tail(log)
    assert "step_0000000006: reading the train state failed on rank 1 (" in log
    assert "step_0000000005: it has no completion marker" in log
    root = runs["dir"] / "b3" / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == [
        "step_0000000004", "step_0000000005.skipped", "step_0000000006.skipped", "step_0000000007.skipped",
        "step_0000000008"]


def test_two_rank_zero3_run_trains(runs):
    losses = [m["train/loss"] for m in metrics(runs["dir"] / "a3") if "train/loss" in m]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses
    summary = (runs["dir"] / "a3" / "summary.json").read_text()
    assert '"status": "done"' in summary and '"eval/loss"' in summary


@pytest.mark.parametrize("stage", ["0", "3"])
def test_a_flipped_byte_in_any_file_of_a_checkpoint_is_caught(runs, stage, tmp_path):
    final = runs["dir"] / f"a{stage}" / FINAL
    names = sorted(p.name for p in final.iterdir())
    assert MARKER in names and len(names) >= (5 if stage == "0" else 7), names
    for name in names:
        copy = shutil.copytree(final, tmp_path / name / "step_0000000008")
        flip_byte(copy / name, (copy / name).stat().st_size // 2)
        found = problems(copy, world_size=2)
        expected = "completion marker" if name == MARKER else f"{name} does not match its checksum"
        assert len(found) == 1 and expected in found[0], (name, found)


def test_verify_checkpoint_names_the_damaged_file(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["dir"] / "a3" / "checkpoints", run_dir / "checkpoints")
    states = run_dir / FINAL / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flip_byte(states, 1000)
    out = run([PYTHON, "-m", "llip_scale.train", "--verify-checkpoint", str(run_dir)])
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    bad, good = out.stderr.strip().splitlines()
    assert bad.startswith(f"{run_dir / FINAL}: zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its checksum")
    assert good.startswith(f"{run_dir / 'checkpoints' / 'step_0000000004'}: ok: step 4, 2 ranks")
    flip_byte(states, 1000)
    out = run([PYTHON, "-m", "llip_scale.train", "--verify-checkpoint", str(run_dir / FINAL)])
    assert out.returncode == 0 and "sizes and CRC-32 checksums match" in out.stdout, out.stderr


def test_export_is_readable_as_the_umask_allows(runs, tmp_path):
    umask = os.umask(0o022)
    try:
        weights = export(runs["dir"] / "a3" / FINAL, tmp_path / "export")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
