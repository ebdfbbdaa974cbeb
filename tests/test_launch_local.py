"""Local submitit launches: preemption and time-out signals, collective save, requeue, exact resume.

Each case launches 2-process training through ``llip-launch``'s code path (submitit
LocalExecutor, the same job function Slurm runs) and compares the final checkpoint, bit for bit,
with an uninterrupted torchrun run of the same config.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from _train_helpers import (
    checkpoint_differences,
    metrics,
    newest_complete,
    run,
    tail,
    train_command,
    wait_for,
    write_config,
)

from llip_scale.config import load_config

pytestmark = pytest.mark.slow
STEPS = 12
# Same launcher settings in every run, so the saved configs compare equal; a time limit that
# never fires here: only the signals the tests send interrupt a run.
LAUNCHER = ["launcher.kind=local", "launcher.tasks_per_node=2", "launcher.time=30", "launcher.signal_delay_s=10"]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _launch(config: Path, run_dir: Path, *overrides: str):
    from llip_scale.launchers.launch import submit

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["OMP_NUM_THREADS"] = "1"
    cfg = load_config(config, [f"run_dir={run_dir}", *LAUNCHER, *overrides])
    return submit(cfg)


def _final(run_dir: Path) -> Path:
    step = newest_complete(run_dir)
    assert step == STEPS, f"run ended at step {step}, not {STEPS}"
    return run_dir / "checkpoints" / f"step_{STEPS:010d}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    config = write_config(tmp / "config.yaml", steps=STEPS, checkpoint={"every": 4, "keep_last": 5},
                          eval={"heldout_samples": 0})
    ref = tmp / "reference"
    out = run(train_command(config, [f"run_dir={ref}", *LAUNCHER]))
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    return tmp, config, _final(ref)


@pytest.mark.parametrize("signals", [
    ("SIGUSR2",),  # a real USR2, as Slurm sends before the time limit
    ("SIGTERM", "SIGUSR2"),  # submitit's preemption simulation (SlurmJob._interrupt): TERM, then USR2
], ids=["usr2", "preemption"])
def test_signal_saves_requeues_and_resumes_exactly(setup, signals):
    tmp, config, reference = setup
    run_dir = tmp / "-".join(signals)
    job = _launch(config, run_dir)
    # the first checkpoint (step 4) exists: mid-run
    wait_for(lambda: newest_complete(run_dir) is not None, "the first checkpoint", gone=job.done)
    tasks = _children(int(job.job_id))
    assert len(tasks) == 2, f"expected 2 task processes under the controller, found {tasks}"
    for name in signals:
        for pid in tasks:
            os.kill(pid, getattr(signal, name))
    wait_for(job.done, "the requeued job's end", poll_s=0.5)
    log = "\n".join(p.read_text(errors="replace") for p in (run_dir / "submitit").glob("*_log.*"))
    assert "Requeued" in log, tail(log)
    assert checkpoint_differences(_final(run_dir), reference) == []
    steps = [m["step"] for m in metrics(run_dir) if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, "a step was trained twice or never"
