"""Process group helpers, the all-gather with gradient, step agreement and the preemption flag."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from llip_scale.dist.collectives import agree, all_gather_with_grad, launch_env, process_group_backend
from llip_scale.dist.signals import PreemptionFlag

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: Path) -> None:
    """One of two ranks: exercise the collectives and save what each rank saw (on the CPU)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    import torch.distributed as dist

    from llip_scale.dist.collectives import (
        all_gather_objects,
        broadcast_object,
        init_distributed,
        lost_peer,
        placement,
    )

    env = init_distributed("auto")
    x = torch.arange(6.0).reshape(3, 2).add(10 * rank).requires_grad_()  # rank r's rows: 10r + ...
    gathered = all_gather_with_grad(x)  # [6, 2]
    # Each rank's loss weighs every gathered row differently, as each rank's pair loss does.
    weights = torch.arange(12.0).reshape(6, 2) * (rank + 1)
    (gathered * weights).sum().backward()
    loss = torch.tensor(float("nan") if rank == 1 else 2.0)
    verdict = agree(loss, stop_requested=rank == 0, save_due=rank == 1)
    result = {"env": (env.rank, env.world_size, env.device.type), "gathered": gathered.detach(),
              "grad": x.grad, "verdict": verdict, "objects": all_gather_objects({"rank": rank}),
              "broadcast": broadcast_object(f"from {rank}"), "quiet": agree(torch.tensor(1.0), False),
              "places": placement(env)}
    if rank == 1:  # a peer that dies: its connections close
        torch.save(result, out / f"rank{rank}.pt")
        os._exit(0)
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as e:
        result["lost"] = lost_peer(e, timeout_minutes=30)
    torch.save(result, out / f"rank{rank}.pt")
    os._exit(0)  # the process group lost a member: no orderly shutdown


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow  # two processes
def test_init_gives_a_gloo_group_on_cpu(two_ranks):
    assert [r["env"] for r in two_ranks] == [(0, 2, "cpu"), (1, 2, "cpu")]


@pytest.mark.slow  # two processes
def test_all_gather_concatenates_in_rank_order(two_ranks):
    expected = torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(6.0).reshape(3, 2) + 10])
    for r in two_ranks:
        assert torch.equal(r["gathered"], expected)


@pytest.mark.slow  # two processes
def test_all_gather_backward_sums_every_ranks_gradient(two_ranks):
    # d(sum_r loss_r)/dx_rank = sum_r weights_r[rows of rank] = (1 + 2) * arange rows.
    base = torch.arange(12.0).reshape(6, 2)
    for rank, r in enumerate(two_ranks):
        assert torch.equal(r["grad"], 3 * base[3 * rank: 3 * rank + 3])


@pytest.mark.slow  # two processes
def test_agree_spreads_a_nonfinite_loss_and_a_stop_request_to_every_rank(two_ranks):
    for r in two_ranks:
        verdict = r["verdict"]
        assert verdict.nonfinite and verdict.stop
        assert verdict.loss == 2.0  # the mean of the finite losses


@pytest.mark.slow  # two processes
def test_agree_saves_on_every_rank_when_one_rank_says_a_save_is_due(two_ranks):
    for r in two_ranks:
        assert r["verdict"].save and not r["quiet"].save and not r["quiet"].stop


@pytest.mark.slow  # two processes
def test_a_dead_peer_is_named_by_rank_and_host(two_ranks):
    host = socket.gethostname()
    places = two_ranks[0]["places"]
    assert [(p.rank, p.host, p.local_rank) for p in places] == [(0, host, 0), (1, host, 1)]
    assert two_ranks[1]["places"] == places
    address = places[1].address
    assert two_ranks[0]["lost"].startswith(
        f"rank 0 lost contact with the job: rank(s) 1 on host {host} ({address}) stopped answering; "
        f"ranks: 0@{host}, 1@{host}."), two_ranks[0]["lost"]


def test_errors_that_are_not_a_lost_peer_are_left_alone(monkeypatch):
    import torch.distributed as dist  # noqa: I001 - patched below, for this test only

    from llip_scale.dist import collectives as distributed

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert distributed.lost_peer(RuntimeError("DataLoader worker timed out after 5 seconds"), 30) is None
    assert distributed.lost_peer(RuntimeError("CUDA out of memory"), 30) is None
    hung = distributed.lost_peer(RuntimeError(
        "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 1800000ms for recv operation to complete"), 30)
    assert hung.startswith("rank 0 lost contact with the job: a peer did not answer within "
                           "distributed.timeout_minutes=30 (a hung or unreachable node)"), hung


@pytest.mark.slow  # two processes
def test_objects_are_exchanged(two_ranks):
    for r in two_ranks:
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
        assert r["broadcast"] == "from 0"


def test_single_process_gather_is_the_identity():
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x
    verdict = agree(torch.tensor(1.5), stop_requested=False)
    assert (verdict.loss, verdict.nonfinite, verdict.stop) == (1.5, False, False)


def test_launch_env_reads_torchrun_then_slurm(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    assert launch_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launch_env() == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    assert launch_env()[0] == 2


def test_nccl_without_cuda_is_refused():
    with pytest.raises(RuntimeError, match="distributed.backend=auto"):
        process_group_backend("nccl", torch.device("cpu"))
    assert process_group_backend("auto", torch.device("cpu")) == "gloo"


def test_preemption_flag_is_set_by_a_signal_and_restored():
    before = signal.getsignal(signal.SIGUSR1)
    flag = PreemptionFlag(["SIGUSR1", "term"]).install()
    try:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.received == "SIGUSR1"
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_unknown_signal_name_is_refused():
    with pytest.raises(ValueError, match="SIGUSR1"):
        PreemptionFlag(["SIGNOPE"])
