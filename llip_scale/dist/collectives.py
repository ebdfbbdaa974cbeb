"""Process group, rank helpers, the text-side all-gather, and the per-step agreement.

Flow: launcher environment (torchrun: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
Slurm: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) -> :func:`init_distributed` -> a
:class:`DistEnv` (rank, world size, device) with the default process group up (gloo on CPU, nccl
on CUDA; a one-process run gets a one-rank group so the rest of the code has a single path).

In the training step each rank all-gathers the text side with :func:`all_gather_with_grad`,
whose backward *sums* the incoming gradients over ranks and keeps this rank's rows (a
reduce-scatter), then once per step :func:`agree` all-reduces the loss together with the
"loss is non-finite", "stop requested" and "save due" flags, so every rank takes the same decision
at the same step boundary. Signal handlers (:class:`llip_scale.dist.signals.PreemptionFlag`) only set
a local flag.

Across nodes: :func:`placement` gathers every rank's host and address once at the start (each
rank logs its own), so that when a peer dies or hangs :func:`lost_peer` can turn the collective's
error (a closed connection names the peer's address; a hung peer runs into
``distributed.timeout_minutes``) into one line naming the rank(s) and host that stopped answering.
"""
from __future__ import annotations

import atexit
import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(names: Sequence[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or Slurm variables; (0, 1, 0) when absent."""
    rank = _env_int(("RANK", "SLURM_PROCID"), 0)
    world = _env_int(("WORLD_SIZE", "SLURM_NTASKS"), 1)
    local = _env_int(("LOCAL_RANK", "SLURM_LOCALID"), 0)
    return rank, world, local


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group_backend(requested: str, device: torch.device) -> str:
    """``auto``: nccl on CUDA, gloo elsewhere."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise RuntimeError("distributed.backend=nccl needs CUDA devices; use distributed.backend=auto (gloo on CPU)")
    return requested


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Bring up the default process group (idempotent) and return this process's DistEnv."""
    rank, world, local = launch_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if world > 1 and not os.environ.get("MASTER_ADDR"):
            raise RuntimeError(f"a {world}-process run needs MASTER_ADDR and MASTER_PORT; launch it with "
                               "torchrun or the llip_scale launchers")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # DeepSpeed reads these instead of asking the process group.
        for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
            os.environ[key] = str(value)
        dist.init_process_group(process_group_backend(backend, device), rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_without_teardown(code: int) -> NoReturn:
    """End a rank whose work is done and saved: Python's exit hooks run (they end open loaders'
    workers), the interpreter's teardown does not. There a native thread of the communication
    stack left joinable can abort a finished rank ("terminate called without an active
    exception") and turn a complete run into a failed one."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# all-gather with gradient
# ---------------------------------------------------------------------------------------------

class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # [B_local, ...] -> [world * B_local, ...]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank's loss depends on every rank's rows: this rank's gradient is the sum of
        # all ranks' gradients for its rows, i.e. a reduce-scatter (sum) of the gathered grads.
        grad = grad.contiguous()
        rows, rank = ctx.rows, dist.get_rank()
        if dist.get_backend() == "nccl":
            out = torch.empty((rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out
        total = grad.clone()  # gloo has no reduce-scatter: all-reduce, then keep our rows
        dist.all_reduce(total)
        return total.narrow(0, rank * rows, rows)


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` [B_local, ...] from all ranks in rank order -> [world * B_local, ...].

    All ranks must pass the same shape. Backward sums the gradients of all ranks (each rank's
    loss covers its images against every text), so averaging the per-rank losses over ranks, as
    data-parallel training does, gives the gradient of the global-batch loss.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


# ---------------------------------------------------------------------------------------------
# per-step agreement and preemption
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepVerdict:
    loss: float  # mean over ranks of the finite per-rank losses (nan when none is finite)
    nonfinite: bool  # some rank's loss is nan or inf: every rank skips the update
    stop: bool  # some rank was asked to stop: every rank saves and exits after this step
    save: bool = False  # some rank's clock says a timed checkpoint is due: every rank saves now


def agree(loss: Tensor, stop_requested: bool, save_due: bool = False) -> StepVerdict:
    """One all-reduce per step: the global loss and the flags every rank must act on together."""
    finite = bool(torch.isfinite(loss.detach()).item())
    packed = torch.tensor([loss.detach().float().item() if finite else 0.0, float(finite),
                           float(not finite), float(stop_requested), float(save_due)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        packed = packed.to(_collective_device())
        dist.all_reduce(packed)
        packed = packed.cpu()
    total, n_finite, n_bad, n_stop, n_save = packed.tolist()
    return StepVerdict(total / n_finite if n_finite else float("nan"), n_bad > 0, n_stop > 0, n_save > 0)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (small, picklable), in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (small, picklable)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# where the ranks run, and which one stopped answering
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankPlace:
    rank: int
    host: str
    address: str  # what the host name resolves to: the address gloo binds by default
    local_rank: int


_PLACES: list[RankPlace] = []  # every rank's place, from placement(); read by lost_peer()


def _host_address(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return "unresolved"


def placement(env: DistEnv) -> list[RankPlace]:
    """Every rank's host and address, in rank order (a collective); remembered for lost_peer."""
    host = socket.gethostname()
    here = RankPlace(env.rank, host, _host_address(host), env.local_rank)
    _PLACES[:] = [RankPlace(*p) for p in all_gather_objects(tuple(vars(here).values()))]
    return list(_PLACES)


def describe_place(env: DistEnv) -> str:
    """One line about this rank: host, address, node-local rank, rendezvous address."""
    host = socket.gethostname()
    return (f"rank {env.rank} of {env.world_size} on host {host} ({_host_address(host)}), local rank "
            f"{env.local_rank}; rendezvous {os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}")


# How gloo and NCCL report a peer that died (closed or reset connection) or hung (the process
# group's timeout), e.g. "[.../gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:7570:
# Connection reset by peer" or "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting
# 1800000ms for recv operation to complete": a phrase of either kind from a collective's backend.
_PEER_FAILURE = re.compile(r"connection closed by peer|connection reset by peer|broken pipe|timed out|timeout|"
                           r"communicator was aborted", re.IGNORECASE)
_BACKEND = re.compile(r"gloo|nccl|c10d|ProcessGroup", re.IGNORECASE)
_PEER_ADDRESS = re.compile(r"\[(\d+\.\d+\.\d+\.\d+)\]:\d+")


def lost_peer(error: BaseException, timeout_minutes: float) -> Optional[str]:
    """One line naming the rank(s) and host that stopped answering, when ``error`` is a collective
    that lost a peer; None for any other error."""
    text = str(error)
    from_backend = isinstance(error, dist.DistError) or bool(_BACKEND.search(text))
    if not dist.is_initialized() or dist.get_world_size() == 1 or not (from_backend and _PEER_FAILURE.search(text)):
        return None
    me = dist.get_rank()
    found = _PEER_ADDRESS.search(text)
    peers = [p for p in _PLACES if found and p.address == found.group(1) and p.rank != me]
    if peers:
        ranks = ", ".join(str(p.rank) for p in peers)
        who = f"rank(s) {ranks} on host {peers[0].host} ({peers[0].address}) stopped answering"
    elif found:
        who = f"the peer at {found.group(1)} stopped answering"
    else:
        who = (f"a peer did not answer within distributed.timeout_minutes={timeout_minutes:g} "
               "(a hung or unreachable node)")
    hosts = ", ".join(f"{p.rank}@{p.host}" for p in _PLACES)
    return (f"rank {me} lost contact with the job: {who}; ranks: {hosts}. The newest complete checkpoint "
            f"is intact; requeue or rerun to continue ({text.strip().splitlines()[0][:200]})")
