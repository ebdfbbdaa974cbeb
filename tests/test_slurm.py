"""Preemption on a real Slurm: every way a cluster stops a job ends in an exact resume.

A single-node Slurm (``tools/slurm_local.sh``: munged, MariaDB + slurmdbd, slurmctld, slurmd) runs
the demo config at its smallest through ``llip-launch --wait``: 2 tasks, one DataLoader worker
each, webdataset shards and a SentencePiece tokenizer. Each test stops the job the way a cluster
does, waits (on job states, files and process exits, never on fixed sleeps) for ``--wait`` to
report the final state, and compares the final checkpoint, every saved tensor bit for bit (model,
optimizer, scheduler, data state, RNG), with the uninterrupted run's.

Needs root (to start the daemons; Debian's packages are installed when absent). Where that is not
possible the tests fail with one line saying why.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytest
from _train_helpers import HANG_LIMIT_S, REPO, checkpoint_differences, metrics, newest_complete, run_env, tail, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 12
SLURM_LOCAL = REPO / "tools" / "slurm_local.sh"
SMALLEST = ["steps=12", "batch_size=8", "checkpoint.every=4", "checkpoint.keep_last=5", "logging.every=5",
            "data.workers=1", "eval.heldout_samples=0", "eval.mixing_images=0", "eval.zeroshot_dir=''",
            "eval.retrieval_dir=''", "model.vision.image_size=32", "model.vision.patch_size=16",
            "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2", "model.vision.mlp_dim=64",
            "model.vision.num_tokens=4", "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
            "model.text.mlp_dim=64", "model.head.embed_dim=32", "model.head.num_heads=2"]
# The same in every run, so the saved configs compare equal: a long time limit that only the
# tests shorten, and USR2 4 minutes before it (room for a save on a busy machine).
LAUNCHER = ["launcher.kind=slurm", "launcher.tasks_per_node=2", "launcher.cpus_per_task=1", "launcher.time=30",
            "launcher.signal_delay_s=240"]
SIGTERM, SIGUSR2 = 15, 12


# ---------------------------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------------------------

def _slurm_local(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM_LOCAL), *args], capture_output=True, text=True)


def _start_slurm(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests start munged, slurmctld and slurmd and need root; run them as root", pytrace=False)
    out = _slurm_local("start", *args)
    if out.returncode != 0:
        pytest.fail(f"could not start the local Slurm: {(out.stderr or out.stdout).strip()}", pytrace=False)


@pytest.fixture(scope="module")
def slurm():
    was_running = _slurm_local("status").returncode == 0
    _start_slurm()
    conf = _slurm_local("env").stdout.split("=", 1)[1].strip()
    os.environ["SLURM_CONF"] = conf
    yield conf
    if not was_running:
        _slurm_local("stop")


def _scontrol(*args: str) -> str:
    out = subprocess.run(["scontrol", *args], capture_output=True, text=True)
    assert out.returncode == 0, f"scontrol {' '.join(args)}: {out.stderr.strip()}"
    return out.stdout


def job_field(job_id: str, name: str) -> Optional[str]:
    found = re.search(rf"\b{name}=(\S+)", _scontrol("show", "job", "-o", job_id))
    return found.group(1) if found else None


def _proc(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_text(errors="replace")
    except OSError:
        return ""


def step_tasks(job_id: str, node: str = "") -> set[int]:
    """The task processes of the job's step 0 (on ``node``; default: this machine's slurmd)."""
    out = subprocess.run(["scontrol", "listpids", f"{job_id}.0", *([node] if node else [])], capture_output=True,
                         text=True)
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    return {int(row[0]) for row in rows if len(row) == 5 and row[4].isdigit()}


def started_workers(tasks: set[int]) -> list[int]:
    """The DataLoader workers of ``tasks`` that have started their loop: children forked from a
    task (same command line, which a compiler's vfork also has until it execs) that named
    themselves ``pt_data_worker``, as torch's worker loop does first. Stopping a child before that
    can stop something else: in one run the hold stopped a child with a worker's command line that
    never became a worker, stayed named ``python`` after SIGCONT, and its rank never trained a step.
    Read from /proc, so a poll costs microseconds."""
    workers = []
    for task in tasks:
        for pid in map(int, _proc(task, f"task/{task}/children").split()):
            if _proc(pid, "cmdline") == _proc(task, "cmdline") and _proc(pid, "comm").strip() == "pt_data_worker":
                workers.append(pid)
    return workers


def slurmd_log(name: str = "slurmd.log") -> str:
    return (Path(os.environ["SLURM_CONF"]).parents[1] / "log" / name).read_text(errors="replace")


def run_seconds(job_id: str) -> int:
    days, _, clock = job_field(job_id, "RunTime").rpartition("-")
    h, m, sec = (int(x) for x in clock.split(":"))
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec


def wait_until(what: str, condition: Callable[[], bool], launch: Optional[subprocess.Popen] = None,
               log: Optional[Callable[[], str]] = None, poll_s: float = 0.5) -> None:
    """Poll ``condition`` until it holds; fail early, with its output, when the launch ended first.
    ``log``: what else to show when it fails (e.g. the tasks' logs of a launch that hangs)."""
    ended = (lambda: launch.poll() is not None) if launch is not None else (lambda: False)
    try:
        wait_for(condition, what, ended, poll_s=poll_s)
    except AssertionError as e:
        output = f"\n{tail(launch.stdout.read())}" if launch is not None and ended() else ""
        logged = f"\n{tail(log(), 60)}" if log is not None else ""
        raise AssertionError(f"{e}{output}{logged}") from None


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------

class Launch:
    """``llip-launch --wait`` of the smallest demo run, in the background."""

    def __init__(self, demo_data: Path, run_dir: Path, env: Optional[dict] = None, extra: Sequence[str] = ()):
        self.run_dir = run_dir
        d = demo_data
        cmd = [sys.executable, "-m", "llip_scale.launchers.launch", str(REPO / "configs/experiments/demo.yaml"),
               f"run_dir={run_dir}", f"data.shards={d / 'train'}", f"data.tokenizer={d / 'tokenizer.model'}",
               *SMALLEST, *LAUNCHER, *extra, "--wait"]
        env = dict(run_env(), SLURM_CONF=os.environ["SLURM_CONF"], **(env or {}))
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        lines = [self.proc.stdout.readline()]
        while lines[-1] and "submitted job" not in lines[-1]:  # warnings come first
            lines.append(self.proc.stdout.readline())
        found = re.search(r"submitted job (\d+)", lines[-1])
        assert found, "llip-launch did not submit:\n" + "".join(lines)
        self.job_id = found.group(1)

    def state(self) -> Optional[str]:
        return job_field(self.job_id, "JobState")

    def tasks(self) -> set[int]:
        return step_tasks(self.job_id)

    def slurmd_log(self) -> str:
        return slurmd_log()

    def hold(self) -> None:
        """Hold the run early, mid-run, whatever the machine's speed: stop (SIGSTOP) the tasks'
        DataLoader workers as soon as they have started their loop, so training blocks at step 1-3
        waiting for data (the whole run takes a few seconds: the workers are watched through /proc
        every few milliseconds, not through scontrol). Slurm sends SIGCONT ahead of every signal it
        delivers, which lets them go on."""
        wait_until("the job's tasks", lambda: len(self.tasks()) == 2, self.proc)
        tasks = self.tasks()
        self.log_offset = len(self.slurmd_log())  # the log outlives job ids: read only what comes next
        self.workers: list[int] = []

        def stop_started() -> bool:
            for pid in started_workers(tasks):
                if pid not in self.workers:
                    os.kill(pid, signal.SIGSTOP)
                    self.workers.append(pid)
            return len(self.workers) == 2

        wait_until("the DataLoader workers", stop_started, self.proc, poll_s=0.005)

    def release_after(self, signum: int) -> None:
        """Wait until slurmd delivered ``signum`` to the job's step; make sure the workers go on."""
        line = f"Sent signal {signum} to StepId={self.job_id}.0"
        wait_until(f"Slurm sending signal {signum}", lambda: line in self.slurmd_log()[self.log_offset:], self.proc)
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def wait_requeued(self) -> None:
        wait_until("the requeue", lambda: self.state() == "PENDING", self.proc)

    def finish(self) -> str:
        """Wait for llip-launch to report the final state; return its output."""
        out, _ = self.proc.communicate(timeout=HANG_LIMIT_S)
        assert self.proc.returncode == 0, f"llip-launch --wait exited {self.proc.returncode}:\n{tail(out)}"
        assert f"job {self.job_id}: COMPLETED" in out, tail(out)
        return out

    def task_log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted((self.run_dir / "submitit").glob("*_log.*")))

    def final_checkpoint(self) -> Path:
        step = newest_complete(self.run_dir)
        assert step == STEPS, f"the run ended at step {step}, not {STEPS}:\n{tail(self.task_log())}"
        return self.run_dir / "checkpoints" / f"step_{STEPS:010d}"


def requeued(launch_output: str) -> bool:
    """Whether ``--wait`` saw the job pending again after it had left the queue. ``--wait`` polls,
    so a short first run may show only as COMPLETING (its tasks ending on the requeue)."""
    states = re.findall(r"job \d+: (\S+)", launch_output)
    started = [i for i, state in enumerate(states) if state != "PENDING"]
    return bool(started) and "PENDING" in states[started[0]:]


def test_requeued_reads_the_states_wait_reported():
    assert requeued("job 1: PENDING\njob 1: RUNNING\njob 1: PENDING\njob 1: RUNNING\njob 1: COMPLETED\n")
    assert requeued("job 1: PENDING\njob 1: COMPLETING\njob 1: PENDING\njob 1: RUNNING\njob 1: COMPLETED\n")
    assert not requeued("job 1: PENDING\njob 1: RUNNING\njob 1: COMPLETING\njob 1: COMPLETED\n")
    assert not requeued("job 1: PENDING\njob 1: PENDING\n")


def check_exact_resume(launch: Launch, reference: Path, stopped_by: str) -> None:
    out = launch.finish()
    log = launch.task_log()
    assert f"stopped by {stopped_by}" in log, tail(log)
    assert requeued(out), f"--wait never saw the job requeued:\n{tail(out)}"
    assert "Traceback" not in log, tail(log, 80)
    assert checkpoint_differences(launch.final_checkpoint(), reference) == []
    losses = {m["step"]: m["train/loss"] for m in metrics(launch.run_dir) if "train/loss" in m}
    steps = [m["step"] for m in metrics(launch.run_dir) if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, "a step was logged twice or never"
    # Each logged loss averages the same steps as the uninterrupted run's, across the resume.
    expected = {m["step"]: m["train/loss"] for m in metrics(reference.parents[1]) if "train/loss" in m}
    assert losses == expected


@pytest.fixture(scope="module")
def reference(slurm, demo_data, tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted run; USR2 keeps arriving from its last step until its tasks have exited
    (as a time-limit warning can), and the job must still end COMPLETED."""
    tmp = tmp_path_factory.mktemp("slurm")
    launch = Launch(demo_data, tmp / "reference")
    summary = launch.run_dir / "summary.json"
    wait_until("the end of training", summary.is_file, launch.proc)
    signals = 0
    while launch.state() == "RUNNING":
        subprocess.run(["scancel", "--signal=USR2", launch.job_id], capture_output=True)
        signals += 1
        time.sleep(0.1)
    out = launch.finish()
    assert json.loads(summary.read_text())["status"] == "done"
    assert signals > 0 and not requeued(out), f"the finished job was requeued:\n{out}"
    return tmp, launch.final_checkpoint()


def test_completes_despite_signals_after_the_last_step(reference):
    tmp, final = reference
    assert final.is_dir()


def test_time_limit_saves_requeues_and_resumes_exactly(reference, demo_data):
    tmp, ref = reference
    launch = Launch(demo_data, tmp / "time_limit")
    launch.hold()
    # A limit 4-5 minutes ahead: USR2 (signal_delay_s=240 before it) is due at once, and the
    # controller sends it at its next time-limit check (every 30 s).
    minutes = -(-run_seconds(launch.job_id) // 60) + 4
    _scontrol("update", f"JobId={launch.job_id}", f"TimeLimit={minutes}")
    launch.release_after(SIGUSR2)
    launch.wait_requeued()
    _scontrol("update", f"JobId={launch.job_id}", "TimeLimit=30")  # the requeued job gets its full time again
    check_exact_resume(launch, ref, "SIGUSR2")


def test_scontrol_requeue_resumes_exactly(reference, demo_data):
    tmp, ref = reference
    launch = Launch(demo_data, tmp / "requeue")
    launch.hold()
    _scontrol("requeue", launch.job_id)
    launch.release_after(SIGTERM)
    check_exact_resume(launch, ref, "SIGTERM")
    assert "not requeuing it again" in launch.task_log()


def _preempt() -> None:
    """A job on the higher-priority partition that needs the whole node."""
    out = subprocess.run(["sbatch", "--partition=urgent", "--exclusive", "--output=/dev/null", "--wrap=true"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_preemption_with_term_resumes_exactly(reference, demo_data):
    tmp, ref = reference
    launch = Launch(demo_data, tmp / "preempt_term")
    launch.hold()
    _preempt()
    launch.release_after(SIGTERM)
    check_exact_resume(launch, ref, "SIGTERM")


def test_preemption_with_user_signal_resumes_exactly(reference, demo_data):
    tmp, ref = reference
    _start_slurm("--user-signal")  # SlurmctldParameters=preempt_send_user_signal
    try:
        launch = Launch(demo_data, tmp / "preempt_usr2")
        launch.hold()
        _preempt()
        launch.release_after(SIGUSR2)
        check_exact_resume(launch, ref, "SIGUSR2")
    finally:
        _start_slurm()


def test_wait_reports_a_failed_job(slurm, demo_data, tmp_path):
    """``--wait`` exits non-zero with the final state when the job fails."""
    d = demo_data
    out = subprocess.run(
        [sys.executable, "-m", "llip_scale.launchers.launch", str(REPO / "configs/experiments/demo.yaml"),
         f"run_dir={tmp_path / 'run'}", f"data.shards={d / 'train'}", f"data.tokenizer={d / 'tokenizer.model'}",
         *SMALLEST, *LAUNCHER, "launcher.setup=['exit 3']", "--wait"],
        cwd=REPO, env=dict(run_env(), SLURM_CONF=os.environ["SLURM_CONF"]), capture_output=True, text=True,
        timeout=HANG_LIMIT_S)
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"job \d+ ended FAILED", out.stderr), out.stderr


# ---------------------------------------------------------------------------------------------
# a stop signal in the first seconds of an attempt
# ---------------------------------------------------------------------------------------------

def seconds_since_start(job_id: str) -> float:
    """Seconds since the current attempt started, from Slurm's StartTime (whole seconds, local
    time): never less than the true value, so waiting for it to reach X waits at least X."""
    started = time.mktime(time.strptime(job_field(job_id, "StartTime"), "%Y-%m-%dT%H:%M:%S"))
    return time.time() - started


class Holds:
    """Start-up phases at which the tasks wait (see llip_scale.dist.signals.hold)."""

    def __init__(self, folder: Path, *points: tuple[str, int]):
        self.folder = folder
        folder.mkdir()
        for phase, attempt in points:
            (folder / f"hold-{phase}-{attempt}").touch()

    def env(self) -> dict:
        return {"LLIP_HOLD_DIR": str(self.folder)}

    def wait_held(self, launch: Launch, phase: str, attempt: int) -> None:
        held = lambda: len(list(self.folder.glob(f"held-{phase}-{attempt}-*"))) == 2  # noqa: E731
        wait_until(f"both tasks of attempt {attempt} held at {phase}", held, launch.proc)

    def release(self, phase: str, attempt: int) -> None:
        (self.folder / f"release-{phase}-{attempt}").touch()


def _preempt_held(launch: Launch, holds: Holds, phase: str, attempt: int, after_s: float) -> None:
    """Preempt the job while its tasks wait at ``phase``, at least ``after_s`` after the attempt
    started; let them go on once slurmd delivered the TERM."""
    holds.wait_held(launch, phase, attempt)
    wait_until(f"{after_s} s into attempt {attempt}", lambda: seconds_since_start(launch.job_id) >= after_s)
    offset = len(slurmd_log())
    _preempt()
    line = f"Sent signal {SIGTERM} to StepId={launch.job_id}.0"
    wait_until("Slurm sending TERM to the tasks", lambda: line in slurmd_log()[offset:], launch.proc)
    holds.release(phase, attempt)


# The phases of a task's start-up, and how far into the attempt each is reached at the earliest:
# the task's first code (nothing imported yet), the job unpickled (torch and this package
# imported, submitit's handlers installed), and the model built and resumed.
EARLY = [("task-start", 0.1), ("job-start", 1.0), ("before-first-step", 3.0)]


@pytest.mark.parametrize("phase,after_s", EARLY, ids=[phase for phase, _ in EARLY])
def test_preemption_early_in_an_attempt_requeues_and_resumes_exactly(reference, demo_data, phase, after_s):
    tmp, ref = reference
    holds = Holds(tmp / f"holds_{phase}", (phase, 0))
    launch = Launch(demo_data, tmp / f"early_{phase}", holds.env())
    _preempt_held(launch, holds, phase, 0, after_s)
    check_exact_resume(launch, ref, "SIGTERM")
    assert "before the first step of this attempt (step 0)" in launch.task_log(), tail(launch.task_log())


def test_two_preemptions_in_a_row_resume_exactly(reference, demo_data):
    """Preempted before its first step, then again in the first instant of the next attempt."""
    tmp, ref = reference
    holds = Holds(tmp / "holds_twice", ("before-first-step", 0), ("task-start", 1))
    launch = Launch(demo_data, tmp / "twice", holds.env())
    _preempt_held(launch, holds, "before-first-step", 0, 3.0)
    _preempt_held(launch, holds, "task-start", 1, 0.1)
    check_exact_resume(launch, ref, "SIGTERM")
    log = launch.task_log()
    assert log.count("before the first step of this attempt (step 0)") == 2, tail(log)
