"""Stop signals from a task's first instant: recorded, handed to the run, never the default action.

The task entry (``python -m llip_scale.launchers.task``, behind the shell prelude the launchers
use) is run for real with a tiny module in place of submitit's task main; a task is held at a
start-up phase with ``LLIP_HOLD_DIR`` (an event, whatever the machine's speed) while the test
sends the signal. The training entry point gets a TERM before its first step and must stop
there, without a step or a save, asking to be rerun.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import types
from pathlib import Path

import pytest
from _train_helpers import HANG_LIMIT_S, REPO, newest_complete, run_env, tail, train_command, wait_for, write_config

from llip_scale.dist import signals
from llip_scale.dist.signals import PreemptionFlag, hold, is_recorder, record_early
from llip_scale.launchers import task

PROBE = '''
import json, signal, sys
from llip_scale.dist.signals import early_signals
print(json.dumps({"argv": sys.argv[1:], "early": early_signals(),
                  "term_handler": getattr(signal.getsignal(signal.SIGTERM), "__name__", str(signal.getsignal(signal.SIGTERM)))}))
'''


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    early = list(signals._early)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    signals._early[:] = early


def _held(folder: Path, phase: str) -> bool:
    return any(folder.glob(f"held-{phase}-0-*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_task_entry_records_a_signal_before_anything_is_imported(tmp_path, sig):
    (tmp_path / "llip_probe.py").write_text(PROBE)
    holds = tmp_path / "holds"
    holds.mkdir()
    (holds / "hold-task-start-0").touch()
    command = f"{task.python_command()} -u -m llip_probe one two"
    env = dict(run_env(), LLIP_HOLD_DIR=str(holds), PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    proc = subprocess.Popen(shlex.split(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _held(holds, "task-start"), "the task held at its first code", lambda: proc.poll() is not None)
        assert "torch" not in Path(f"/proc/{proc.pid}/maps").read_text(), "torch was loaded before the recorder"
        os.kill(proc.pid, sig)
        (holds / "release-task-start-0").touch()
        out, err = proc.communicate(timeout=HANG_LIMIT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    result = __import__("json").loads(out)
    assert result == {"argv": ["one", "two"], "early": [sig.name], "term_handler": "_record"}


def test_the_prelude_ignores_stop_signals_until_python_records_them():
    """The shell ignores the stop signals before it execs Python (an ignored signal survives exec)."""
    words = shlex.split(task.python_command("cat"))  # sh -c PRELUDE NAME cat -u -m llip_scale.launchers.task
    assert words[-3:] == ["-u", "-m", "llip_scale.launchers.task"]
    out = subprocess.run([*words[:-3], "/proc/self/status"], capture_output=True, text=True, timeout=HANG_LIMIT_S)
    ignored = int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("SigIgn:")), 16)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        assert ignored & (1 << (sig - 1)), f"{sig.name} is not ignored: {out.stdout}{out.stderr}"


def test_flag_takes_over_signals_recorded_before_it(restore_signals):
    record_early()
    os.kill(os.getpid(), signal.SIGUSR1)
    flag = PreemptionFlag(["SIGUSR1", "SIGTERM"]).install()
    try:
        assert flag.requested and flag.received == "SIGUSR1"
        assert not is_recorder(signal.getsignal(signal.SIGTERM))
    finally:
        flag.restore()


def test_flag_ignores_a_recorded_signal_it_does_not_listen_to(restore_signals):
    record_early()
    os.kill(os.getpid(), signal.SIGUSR2)
    flag = PreemptionFlag(["SIGTERM"]).install()
    try:
        assert not flag.requested
    finally:
        flag.restore()


def test_submitit_handlers_are_replaced_by_the_recorder_and_the_requeue_kept(restore_signals, monkeypatch):
    """Whatever submitit installs after unpickling the job, the recorder is back at once and
    submitit's requeue handler is kept for the job."""
    from submitit.core import job_environment

    def requeue(*_):
        return "requeued"

    def submitit_like(self, paths, submission):  # the shape of submitit's own method
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGUSR2, requeue)

    monkeypatch.setattr(job_environment.JobEnvironment, "_handle_signals", submitit_like)
    monkeypatch.setattr(task, "_requeue_handler", None)
    task.keep_recording_through_submitit()
    task.keep_recording_through_submitit()  # idempotent: wraps once
    env = types.SimpleNamespace(_usr_sig=lambda: signal.SIGUSR2)
    job_environment.JobEnvironment._handle_signals(env, None, None)
    assert task.requeue_handler() is requeue
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        assert is_recorder(signal.getsignal(sig)), sig.name


def test_submitit_still_installs_its_handlers_where_we_expect(restore_signals, tmp_path, monkeypatch):
    """The real submitit method: TERM only logged, USR2 checkpoint-and-requeue (what we keep)."""
    from submitit.core import job_environment, utils
    from submitit.local.local import LocalJobEnvironment

    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path))
    monkeypatch.setattr(task, "_requeue_handler", None)
    original = job_environment.JobEnvironment._handle_signals
    monkeypatch.setattr(job_environment.JobEnvironment, "_handle_signals", original)
    task.keep_recording_through_submitit()
    env = object.__new__(LocalJobEnvironment)  # no job around: skip the environment's detection
    paths = utils.JobPaths(tmp_path, job_id="1", task_id=0)
    job_environment.JobEnvironment._handle_signals(env, paths, utils.DelayedSubmission(print))
    assert getattr(task.requeue_handler(), "__name__", "") == "checkpoint_and_try_requeue"
    assert is_recorder(signal.getsignal(signal.SIGTERM))


def test_hold_waits_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("LLIP_HOLD_DIR", str(tmp_path))
    hold("task-start")  # no hold file: returns at once
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_training_stops_before_its_first_step_on_an_early_term(tmp_path):
    """TERM while the run is held just before its first step: no step, no save, exit 75."""
    holds = tmp_path / "holds"
    holds.mkdir()
    (holds / "hold-before-first-step-0").touch()
    cfg = write_config(tmp_path / "cfg.yaml", run_dir=str(tmp_path / "run"))
    env = dict(run_env(), LLIP_HOLD_DIR=str(holds))
    proc = subprocess.Popen(train_command(cfg, [], nproc=1), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _held(holds, "before-first-step"), "the run held before its first step",
                 lambda: proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)
        (holds / "release-before-first-step-0").touch()
        out, _ = proc.communicate(timeout=HANG_LIMIT_S)
    finally:
        proc.kill()
    assert proc.returncode == 75, tail(out)
    assert "stopped by SIGTERM before the first step of this attempt (step 0)" in out, tail(out)
    assert newest_complete(tmp_path / "run") is None, "a checkpoint was saved without a step"
    logged = (tmp_path / "run" / "metrics.jsonl")
    assert not logged.exists() or "train/loss" not in logged.read_text(), "a step was trained"
