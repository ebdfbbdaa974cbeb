"""``llip-train --nproc N``: N local training processes through torchrun, errors in one line.

config + overrides -> loaded and checked for N ranks (batch split, run folder) before any process
starts -> torchrun, run in this process (standalone rendezvous), starts N copies of
``python -m llip_scale.train CONFIG [overrides]`` -> each rank reports its own error in one line
-> the first failed rank's exit status is returned. torchrun's own failure report (a traceback of
its agent plus a table) is replaced by one line, and only where no rank said why: a rank killed
by a signal, or torchrun itself stopped by one.
"""
from __future__ import annotations

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def torchrun_args(nproc: int, config: str, overrides: list[str]) -> list[str]:
    return ["--standalone", f"--nproc_per_node={nproc}", "-m", "llip_scale.train", config, *overrides]


def _quiet_agent() -> None:
    """torchrun's agent logs each worker it stops or sees fail; the ranks already said why."""
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def run_local(nproc: int, config: str, overrides: list[str]) -> int:
    """Run the training in ``nproc`` local processes; the exit status of the run."""

    _quiet_agent()
    try:
        run(parse_args(torchrun_args(nproc, config, overrides)))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode  # the rank printed its reason
        print(f"llip-train: rank {rank} was killed by {failure.signal_name()}; rerun the same command to "
              "continue from the newest complete checkpoint", file=sys.stderr)
        return 128 - failure.exitcode
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"llip-train: stopped by {name}; rerun the same command to continue from the newest complete "
              "checkpoint", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0
