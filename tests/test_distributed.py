"""Process group helpers, the all-gather with gradient, step agreement and the preemption flag."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from llip_scale.train.distributed import PreemptionFlag, agree, all_gather_with_grad, launch_env, process_group_backend

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: Path) -> None:
    """One of two ranks: exercise the collectives and save what each rank saw (on the CPU)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    from llip_scale.train.distributed import all_gather_objects, broadcast_object, init_distributed, shutdown

    env = init_distributed("auto")
    x = torch.arange(6.0).reshape(3, 2).add(10 * rank).requires_grad_()  # rank r's rows: 10r + ...
    gathered = all_gather_with_grad(x)  # [6, 2]
    # Each rank's loss weighs every gathered row differently, as each rank's pair loss does.
    weights = torch.arange(12.0).reshape(6, 2) * (rank + 1)
    (gathered * weights).sum().backward()
    loss = torch.tensor(float("nan") if rank == 1 else 2.0)
    verdict = agree(loss, stop_requested=rank == 0)
    result = {"env": (env.rank, env.world_size, env.device.type), "gathered": gathered.detach(),
              "grad": x.grad, "verdict": verdict, "objects": all_gather_objects({"rank": rank}),
              "broadcast": broadcast_object(f"from {rank}")}
    torch.save(result, out / f"rank{rank}.pt")
    shutdown()


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
