"""The function a launcher runs in every task: distributed env from the scheduler, then training.

Slurm/local submitit task (its first code, :mod:`llip_scale.launchers.task`, already records the
stop signals) -> RANK/WORLD_SIZE/MASTER_* exported from submitit's job environment ->
llip_scale.train.main(config) -> on a preemption or time-limit signal the trainer saves a complete
checkpoint on every rank and returns EXIT_PREEMPTED -> from then on every task ignores the stop
signals (a TERM of the requeue under way, a late time-limit warning) -> rank 0 asks Slurm whether
it is already requeuing the job (preemption, ``scontrol requeue``); if not, it hands over to
submitit's own signal handler, which calls ``checkpoint()`` (the same job again: resume is
implicit) and requeues; the other ranks exit. Requeues past ``launcher.max_requeues`` time-outs end
the job cleanly. A run that finished ignores the stop signals too, so a signal that arrives while
the tasks exit cannot turn a COMPLETED job into a FAILED one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Callable, Optional

import submitit

from llip_scale.config import load_config
from llip_scale.dist.signals import PreemptionFlag, ignore_stop_signals
from llip_scale.launchers.slurm import slurm_job_state
from llip_scale.launchers.task import requeue_handler
from llip_scale.train.loop import EXIT_PREEMPTED, main


class TrainJob(submitit.helpers.Checkpointable):
    def __init__(self, config_path: str):
        self.config_path = config_path

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        submitit_handler = requeue_handler()  # checkpoint() + requeue, installed by submitit
        cfg = load_config(self.config_path)
        # Until now the task's first code (launchers/task.py) recorded any stop signal; the flag
        # takes those over. Never restored to submitit's handlers: after the run, a late USR2
        # would otherwise requeue a finished job (rank 0) or find the default action while the
        # process exits (FAILED, exit 140).
        preempt = PreemptionFlag(cfg.distributed.preempt_signals).install()
        code = main(cfg, preempt)
        ignore_stop_signals()
        if code == EXIT_PREEMPTED:
            if env.global_rank == 0:
                _requeue(env, submitit_handler)
            sys.exit(0)
        if code != 0:
            raise RuntimeError(f"training exited with status {code}; see the task logs in {os.getcwd()}")
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # The trainer already saved a complete checkpoint; rerunning the job resumes from it.
        return submitit.helpers.DelayedSubmission(TrainJob(self.config_path))


def _say(message: str) -> None:
    print(f"llip-launch: {message}", file=sys.stderr, flush=True)


def _requeue(env: submitit.JobEnvironment, submitit_handler: Optional[Callable]) -> None:
    """Requeue the job unless Slurm already does (then a second request fails: 'Job is pending
    execution'); submitit's handler exits the process after a requeue of its own."""
    slurm = env.cluster == "slurm"
    state = slurm_job_state(env.job_id) if slurm else None
    if state not in (None, "RUNNING"):
        _say(f"Slurm is already requeuing or ending job {env.job_id} (state {state}); not requeuing it again")
        return
    if submitit_handler is None:
        # Not started through launchers/task.py, and submitit's handler is gone: fail visibly
        # rather than end as if the run were complete.
        _say(f"cannot requeue job {env.job_id}: submitit's requeue handler is not installed; relaunch the same "
             "config to continue from the newest checkpoint")
        sys.exit(1)
    try:
        submitit_handler(signal.SIGUSR2, None)  # requeues and exits (or raises when out of requeues)
    except subprocess.CalledProcessError:
        # Slurm may have started a requeue between the check above and ours.
        state = slurm_job_state(env.job_id) if slurm else None
        if state in (None, "RUNNING"):
            raise
        _say(f"Slurm requeued job {env.job_id} first (state {state}); not requeuing it again")
