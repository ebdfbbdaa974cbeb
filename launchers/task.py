"""The first code of every job task: stop signals are recorded before anything heavy is imported.

``python -m llip_scale.launchers.task -u -m submitit.core._submit FOLDER`` is what each task runs
(the launchers set it as submitit's python command, behind a shell that ignores the stop signals
until Python can record them; an ignored signal stays ignored across ``exec``). Flow:
:func:`llip_scale.dist.signals.record_early` -> the scheduler library's task main (unpickle the
job, which imports torch and this package; submitit then installs its own handlers: SIGTERM only
logged, its preemption signal checkpoints and requeues) -> our recorder is put back at once, with
submitit's requeue handler kept for :mod:`llip_scale.launchers.job` -> the job installs the run's
flag, which takes over whatever arrived meanwhile. A signal at any moment of the attempt is
therefore seen by the run, which saves if it has something new to save and requeues.
"""
from __future__ import annotations

import runpy
import shlex
import signal
import sys
from typing import Callable, Optional

from llip_scale.dist.signals import STOP_SIGNALS, hold, is_recorder, record_early

_IGNORE_THEN_EXEC = 'trap "" TERM USR1 USR2; exec "$@"'
# submitit's handler for its preemption signal (checkpoint() + requeue), once it installed it.
_requeue_handler: Optional[Callable] = None


def requeue_handler() -> Optional[Callable]:
    """submitit's checkpoint-and-requeue handler: the one kept here, or (a task that did not start
    through this module) the current USR2 handler; None when there is none."""
    if _requeue_handler is not None:
        return _requeue_handler
    current = signal.getsignal(signal.SIGUSR2)
    return current if callable(current) and not is_recorder(current) else None


def python_command(python: str = sys.executable) -> str:
    """The python command for submitit's executors: the stop signals are ignored from the task's
    first instant (a shell ``trap``), then recorded by this module before any heavy import."""
    return f"sh -c {shlex.quote(_IGNORE_THEN_EXEC)} llip-task {shlex.quote(python)} -u -m llip_scale.launchers.task"


def keep_recording_through_submitit() -> None:
    """After submitit installs its handlers (once the job is unpickled), put the recorder back and
    keep submitit's requeue handler for the job; no stop signal ever reaches submitit's own."""
    from submitit.core import job_environment  # after the recorder: submitit is not light

    original = job_environment.JobEnvironment._handle_signals
    if getattr(original, "keeps_recording", False):
        return

    def handle_signals(env: job_environment.JobEnvironment, paths: object, submission: object) -> None:
        global _requeue_handler
        original(env, paths, submission)
        _requeue_handler = signal.getsignal(env._usr_sig())
        record_early()
        hold("job-start")

    handle_signals.keeps_recording = True  # type: ignore[attr-defined]
    job_environment.JobEnvironment._handle_signals = handle_signals


def main(argv: list[str]) -> None:
    """``[-u] -m MODULE ARGS...``: record stop signals, then run MODULE as ``__main__``."""
    record_early(STOP_SIGNALS)
    hold("task-start")
    while argv[:1] == ["-u"]:  # this interpreter already runs unbuffered (started with -u)
        argv = argv[1:]
    if len(argv) < 2 or argv[0] != "-m":
        raise SystemExit("usage: python -m llip_scale.launchers.task [-u] -m MODULE [ARGS...]")
    keep_recording_through_submitit()
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    from llip_scale.launchers import task  # the imported module, whose kept handler job.py reads

    task.main(sys.argv[1:])
