"""What Slurm says about a job: its state now, and waiting for its final state through requeues.

``scontrol show job`` is asked first: it is the controller's own view (a requeued job is PENDING
again at once) and holds the job for ``MinJobAge`` after it ends; ``sacct`` (accounting) answers
after that. A job is over only in a final state: a requeue (by the job itself at a time limit, by
preemption or by ``scontrol requeue``) sends it back to PENDING under the same job id, so neither
submitit's result files nor a crashed attempt's state end the wait.
"""
from __future__ import annotations

import subprocess
import time
from typing import Callable, Optional

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"})


def _ask(cmd: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _scontrol_state(job_id: str) -> Optional[str]:
    text = _ask(["scontrol", "show", "job", "-o", str(job_id)])
    for word in (text or "").split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return None


def _sacct_state(job_id: str) -> Optional[str]:
    text = _ask(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State"])
    lines = [line.split()[0] for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else None  # e.g. "CANCELLED by 0" -> CANCELLED; newest attempt last


def slurm_job_state(job_id: str) -> Optional[str]:
    """The job's state (RUNNING, PENDING, COMPLETED, ...), or None when Slurm does not answer."""
    return _scontrol_state(job_id) or _sacct_state(job_id)


def wait_for_job(job_id: str, poll_s: float = 5.0, report: Callable[[str], None] = print) -> str:
    """Block until the job reaches a final state and return it, reporting each state change.

    There is no time limit: a job may wait in the queue for days. A Slurm that stops answering
    is reported once and asked again until it answers.
    """
    last: Optional[str] = None
    while True:
        state = slurm_job_state(job_id)
        if state != last:
            report(f"job {job_id}: {state or 'no answer from Slurm (scontrol/sacct); asking again'}")
            last = state
        if state in FINAL_STATES:
            return state
        time.sleep(poll_s)
