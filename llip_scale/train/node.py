"""Work done once per node before training: on the node's local rank 0, while its other ranks wait.

Flow: every rank reports where it runs (host, address, node-local rank) -> local rank 0 of each
node removes the stale build locks of the node's extension folder
(:mod:`llip_scale.train.buildlock`), then builds or loads the DeepSpeed ops a run loads at start,
so the other ranks of the node only load them -> a barrier. Keyed by the node-local rank (torchrun's
LOCAL_RANK, Slurm's SLURM_LOCALID), so it happens once per node whatever the number of nodes.
"""
from __future__ import annotations

import contextlib
import io
import socket
import sys
from typing import Callable

from llip_scale.dist.collectives import DistEnv, barrier, describe_place, placement
from llip_scale.train.buildlock import clear_stale_locks
from llip_scale.train.engine import prebuild_ops


def say(env: DistEnv, message: str) -> None:
    """A line on this rank's stderr whatever its log level (each rank says it once)."""
    prefix = "llip-train" if env.rank == 0 else f"llip-train[rank {env.rank}]"
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)


def prepare_node(env: DistEnv, warn: Callable[[str], None]) -> None:
    """Report this rank's place; on the node's local rank 0, clear stale build locks and build or
    load the DeepSpeed ops; then wait for every rank (a barrier)."""
    say(env, describe_place(env))
    placement(env)  # remembered, so a lost peer can be named by rank and host
    if env.local_rank == 0:  # before any rank of this node loads a run-time built extension
        stale = clear_stale_locks(report=warn)
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's "op built successfully"
            ops = prebuild_ops()
        say(env, f"node setup on host {socket.gethostname()} by rank {env.rank}: {len(stale)} stale build "
                 f"lock(s) removed, DeepSpeed ops ready: {', '.join(ops) or 'none needed'}")
    barrier()
