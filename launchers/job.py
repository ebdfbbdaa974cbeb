"""The function a launcher runs in every task: distributed env from the scheduler, then training.

Slurm/local submitit task -> RANK/WORLD_SIZE/MASTER_* exported from submitit's job environment ->
llip_scale.train.main(config) -> on a preemption or time-limit signal the trainer saves a complete
checkpoint on every rank and returns EXIT_PREEMPTED -> rank 0 hands over to submitit's own signal
handler, which calls ``checkpoint()`` (the same job again: resume is implicit) and requeues; the
other ranks exit. Requeues past ``launcher.max_requeues`` time-outs end the job cleanly.
"""
from __future__ import annotations

import os
import signal
import sys

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    def __init__(self, config_path: str):
        self.config_path = config_path

    def __call__(self) -> int:
        from llip_scale.config import load_config
        from llip_scale.train import EXIT_PREEMPTED, main

        env = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        submitit_handler = signal.getsignal(signal.SIGUSR2)  # checkpoint() + requeue, installed by submitit
        cfg = load_config(self.config_path)
        code = main(cfg)
        if code == EXIT_PREEMPTED:
            if env.global_rank == 0 and callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)  # requeues and exits (or raises when out of requeues)
            sys.exit(0)
        if code != 0:
            raise RuntimeError(f"training exited with status {code}; see the task logs in {os.getcwd()}")
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # The trainer already saved a complete checkpoint; rerunning the job resumes from it.
        return submitit.helpers.DelayedSubmission(TrainJob(self.config_path))
