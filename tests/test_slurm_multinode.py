"""Multi-node runs on a real Slurm: two nodes on this one machine, each a host of its own.

``tools/slurm_local.sh start --nodes 2`` runs slurmd ``node1`` and ``node2``, each in its own
network and UTS namespace (its own hostname and address on a private bridge); the tasks of a job
are forked by their node's slurmd and run inside its namespaces, so the rendezvous and every
collective cross the virtual network, as between the machines of a cluster. The tests run the
smallest demo config (tests/test_slurm.py's SMALLEST) through ``llip-launch --wait``:

* the same run on 2 nodes x 1 task and on 1 node x 2 tasks saves the same checkpoint, every
  tensor bit for bit; every rank says where it runs, and the node-local setup (build locks,
  DeepSpeed ops) happens once per node;
* a 2-node job preempted with TERM saves on both nodes, is requeued and resumes exactly;
* when a node's rank dies (killed) or stops answering (its link down), the rank left leaves
  within a bounded time (a closed connection at once, a hung peer after
  distributed.timeout_minutes) with one line naming the rank and host that stopped answering;
* the script itself leaves no namespace, link or /etc/hosts line behind.

The instance has its own folder and ports ($LLIP_SLURM_MULTINODE_DIR, $LLIP_SLURM_MULTINODE_PORT_BASE),
so it runs beside the single-node one of tests/test_slurm.py. Needs root, as those tests do.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from _train_helpers import (
    HANG_LIMIT_S,
    REPO,
    checkpoint_differences,
    metrics,
    newest_complete,
    tail,
    weight_differences,
)
from test_slurm import (
    SIGTERM,
    Holds,
    Launch,
    _preempt,
    check_exact_resume,
    requeued,
    slurmd_log,
    step_tasks,
    wait_until,
)

from llip_scale.checkpoints.deepspeed_io import consolidated_state_dict

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
MN_DIR = os.environ.get("LLIP_SLURM_MULTINODE_DIR", "/var/tmp/llip-slurm-multinode")
MN_PORT_BASE = os.environ.get("LLIP_SLURM_MULTINODE_PORT_BASE", "16827")
MN_CONF = f"{MN_DIR}/etc/slurm.conf"
NODES = ("node1", "node2")
TWO_NODES = ["launcher.nodes=2", "launcher.tasks_per_node=1"]
KEYS = ["data.log_keys=true"]  # a digest of each global batch's sample keys in metrics.jsonl
PLACE = re.compile(r"rank (\d+) of (\d+) on host (\S+) \((\S+)\), local rank (\d+); rendezvous (\S+):\d+")
NODE_SETUP = re.compile(r"node setup on host (\S+) by rank (\d+)")


def _local(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLIP_SLURM_DIR=MN_DIR, LLIP_SLURM_PORT_BASE=MN_PORT_BASE)
    return subprocess.run(["bash", str(REPO / "tools" / "slurm_local.sh"), *args], capture_output=True, text=True,
                          env=env)


def _start_two_nodes() -> None:
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests start munged, slurmctld and slurmd and need root; run them as root", pytrace=False)
    out = _local("start", "--nodes", "2")
    if out.returncode != 0:
        pytest.fail(f"could not start the 2-node local Slurm: {(out.stderr or out.stdout).strip()}", pytrace=False)


def leftovers() -> list[str]:
    """The namespaces, links and /etc/hosts lines of this instance that still exist."""
    tag = f"llip{MN_PORT_BASE}"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout.splitlines()
    found = [f"namespace {line.split()[0]}" for line in netns if line.startswith(tag)]
    found += [f"link {line.split(': ')[1]}" for line in links if line.split(": ")[1].startswith(tag)]
    found += [f"hosts line {line!r}" for line in Path("/etc/hosts").read_text().splitlines()
              if line.endswith(f"# llip-slurm {MN_DIR}")]
    return found


def _srun(*args: str) -> list[str]:
    out = subprocess.run(["srun", *args], capture_output=True, text=True, env=dict(os.environ, SLURM_CONF=MN_CONF),
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


# Runs first, before the module's cluster: it starts and stops an instance of its own.
def test_slurm_local_runs_two_nodes_and_stop_leaves_nothing_behind():
    was_running = _local("status").returncode == 0
    hosts_before = Path("/etc/hosts").read_text()
    _start_two_nodes()
    try:
        status = _local("status")
        assert status.returncode == 0, status.stdout
        nodes = re.findall(r"^(node\d): slurmd running .* address (\S+), state (\S+)", status.stdout, re.M)
        assert [n for n, _, _ in nodes] == list(NODES), status.stdout
        assert all(state in ("idle", "mixed", "allocated") for _, _, state in nodes), status.stdout
        # Each node is its own host: its hostname, its address, and nothing but the bridge.
        seen = _srun("-N2", "--ntasks-per-node=1", "sh", "-c",
                     "echo $(hostname) $(ip -4 -o addr show eth0 | awk '{print $4}') $(ip -4 route | grep -c default)")
        assert sorted(seen) == sorted(f"{n} {addr}/24 0" for n, addr, _ in nodes), seen
        assert {socket.gethostbyname(n) for n in NODES} == {addr for _, addr, _ in nodes}
    finally:
        stop = _local("stop")
    assert stop.returncode == 0, stop.stderr
    assert leftovers() == []
    assert _local("status").returncode == 1
    if was_running:
        _start_two_nodes()
    else:
        assert Path("/etc/hosts").read_text() == hosts_before


@pytest.fixture(scope="module")
def cluster():
    was_running = _local("status").returncode == 0
    _start_two_nodes()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = MN_CONF
    yield MN_CONF
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_running:
        _local("stop")
        assert leftovers() == []


class NodesLaunch(Launch):
    """A launch on the 2-node instance: its workers and signals are found on each node."""

    def tasks(self) -> set[int]:
        return {pid for node in NODES for pid in step_tasks(self.job_id, node)}

    def slurmd_log(self) -> str:
        return slurmd_log("slurmd-node1.log")


def places(log: str) -> list[tuple]:
    return sorted(PLACE.findall(log))


def evaluation(demo_data: Path) -> list[str]:
    """The demo's evaluations at the end of the run, which SMALLEST turns off: zero-shot,
    retrieval and the held-out loss, each a collective over the ranks."""
    return [f"eval.zeroshot_dir={demo_data / 'eval'}", f"eval.retrieval_dir={demo_data / 'eval'}",
            "eval.heldout_samples=16"]


def final_metrics(launch: NodesLaunch) -> dict:
    summary = json.loads((launch.run_dir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if "/" in k}  # e.g. eval/zeroshot/top1


@pytest.fixture(scope="module")
def two_nodes(cluster, demo_data, tmp_path_factory) -> NodesLaunch:
    """The uninterrupted 2 x 1 run."""
    launch = NodesLaunch(demo_data, tmp_path_factory.mktemp("slurm_mn") / "two_nodes",
                         extra=[*TWO_NODES, *KEYS, *evaluation(demo_data)])
    launch.finish()
    return launch


def test_two_nodes_train_exactly_like_two_tasks_on_one_node(two_nodes, demo_data, tmp_path):
    # 1 node x 2 tasks (tests/test_slurm.py's LAUNCHER)
    one = NodesLaunch(demo_data, tmp_path / "one_node", extra=[*KEYS, *evaluation(demo_data)])
    one.finish()
    finals = final_metrics(two_nodes)
    assert any("zeroshot" in k for k in finals) and any("retrieval" in k for k in finals), finals
    assert finals == final_metrics(one)
    log = two_nodes.task_log()
    assert "Traceback" not in log, tail(log, 80)
    diffs = checkpoint_differences(two_nodes.final_checkpoint(), one.final_checkpoint())
    assert sorted(diffs) == ["config.yaml.launcher.nodes: 2 != 1", "config.yaml.launcher.tasks_per_node: 1 != 2"]
    losses = [(m["step"], m["train/loss"]) for m in metrics(two_nodes.run_dir) if "train/loss" in m]
    assert losses and losses == [(m["step"], m["train/loss"]) for m in metrics(one.run_dir) if "train/loss" in m]

    # Each rank ran on its own node, said so once, and met the other at node1 over the bridge.
    addresses = {n: socket.gethostbyname(n) for n in NODES}
    assert places(log) == [("0", "2", "node1", addresses["node1"], "0", "node1"),
                           ("1", "2", "node2", addresses["node2"], "0", "node1")], tail(log, 80)
    # The node-local setup ran once on each node, by its local rank 0.
    assert sorted(NODE_SETUP.findall(log)) == [("node1", "0"), ("node2", "1")], tail(log, 80)
    # On one node: both ranks on the same host, the setup once.
    one_log = one.task_log()
    hosts = {host for _, _, host, _, _, _ in places(one_log)}
    assert len(places(one_log)) == 2 and len(hosts) == 1, tail(one_log, 80)
    assert NODE_SETUP.findall(one_log) == [(hosts.pop(), "0")]


def test_two_by_two_runs_the_node_setup_once_per_node(cluster, demo_data, tmp_path):
    launch = NodesLaunch(demo_data, tmp_path / "two_by_two", extra=["launcher.nodes=2", "launcher.tasks_per_node=2"])
    launch.finish()
    log = launch.task_log()
    assert launch.final_checkpoint().is_dir() and "Traceback" not in log, tail(log, 80)
    ranks = {int(rank): (host, int(local)) for rank, world, host, _, local, _ in places(log) if world == "4"}
    assert ranks == {0: ("node1", 0), 1: ("node1", 1), 2: ("node2", 0), 3: ("node2", 1)}, tail(log, 80)
    assert sorted(NODE_SETUP.findall(log)) == [("node1", "0"), ("node2", "2")], tail(log, 80)


def test_preempting_a_two_node_job_with_term_resumes_exactly(two_nodes, demo_data, tmp_path):
    launch = NodesLaunch(demo_data, tmp_path / "preempt_term", extra=[*TWO_NODES, *KEYS, *evaluation(demo_data)])
    launch.hold()  # one DataLoader worker per node
    _preempt()
    launch.release_after(SIGTERM)
    check_exact_resume(launch, two_nodes.final_checkpoint(), "SIGTERM")
    # Both attempts ran on both nodes.
    assert sorted({(rank, host) for rank, _, host, _, _, _ in places(launch.task_log())}) == \
        [("0", "node1"), ("1", "node2")]


# ---------------------------------------------------------------------------------------------
# losing a node
# ---------------------------------------------------------------------------------------------

def step_task(job_id: str, node: str) -> int:
    """The training process of the job's step 0 on ``node`` (one task per node here)."""
    out = subprocess.run(["scontrol", "listpids", f"{job_id}.0", node], capture_output=True, text=True)
    tasks = [int(row[0]) for row in (line.split() for line in out.stdout.splitlines()[1:])
             if len(row) == 5 and row[4].isdigit()]
    assert len(tasks) == 1, out.stdout + out.stderr
    return tasks[0]


def release(launch: NodesLaunch) -> None:
    for pid in launch.workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def ended(launch: NodesLaunch) -> str:
    """Wait for llip-launch --wait to report a final state other than COMPLETED; its output."""
    out, _ = launch.proc.communicate(timeout=HANG_LIMIT_S)
    assert launch.proc.returncode == 1 and f"job {launch.job_id} ended" in out, tail(out)
    return out


def test_a_killed_rank_on_another_node_ends_the_job_naming_it(cluster, demo_data, tmp_path):
    launch = NodesLaunch(demo_data, tmp_path / "killed", extra=TWO_NODES)
    launch.hold()  # both ranks are past the start, waiting for a batch
    rank1 = step_task(launch.job_id, "node2")
    os.kill(rank1, signal.SIGKILL)
    wait_until("rank 1 to die", lambda: not Path(f"/proc/{rank1}").exists() or
               Path(f"/proc/{rank1}/stat").read_text().split(") ")[1].startswith("Z"), launch.proc)
    release(launch)  # rank 0 goes on to its next collective and finds the connection closed
    out = ended(launch)
    log = launch.task_log()
    address = socket.gethostbyname("node2")
    assert f"rank 0 lost contact with the job: rank(s) 1 on host node2 ({address}) stopped answering" in log, \
        tail(log, 60) + tail(out)


def test_a_rank_behind_a_dead_link_ends_the_job_after_the_timeout(cluster, demo_data, tmp_path):
    """Both ranks wait just before the start-up agreement (the first collective after the model
    is built and the loader started); node2's link goes down; rank 0 goes on into the collective
    and hears nothing back until distributed.timeout_minutes, then leaves with one line."""
    holds = Holds(tmp_path / "holds", ("before-first-step", 0))
    launch = NodesLaunch(demo_data, tmp_path / "link_down", env=holds.env(),
                         extra=[*TWO_NODES, "distributed.timeout_minutes=1"])
    holds.wait_held(launch, "before-first-step", 0)
    link = f"llip{MN_PORT_BASE}n2"  # node2's end on the bridge: nothing reaches node2 any more
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        holds.release("before-first-step", 0)
        wait_until("rank 0 giving up on rank 1", lambda: "rank 0 lost contact with the job" in launch.task_log(),
                   launch.proc, log=launch.task_log)
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    ended(launch)  # once node2 can report again, the job ends
    log = launch.task_log()
    # Unreachable rather than closed: the collective's timeout, or the backend naming node2.
    address = socket.gethostbyname("node2")
    assert ("rank 0 lost contact with the job: a peer did not answer within distributed.timeout_minutes=1" in log
            or f"rank 0 lost contact with the job: rank(s) 1 on host node2 ({address})" in log), tail(log, 60)


def test_min_nodes_starts_on_the_nodes_that_are_up(cluster, demo_data, tmp_path):
    """launcher.min_nodes=1 of 2 with node2 drained: Slurm starts the job on node1 alone."""
    subprocess.run(["scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=test"], check=True)
    try:
        launch = NodesLaunch(demo_data, tmp_path / "min_nodes", extra=[*TWO_NODES, "launcher.min_nodes=1"])
        launch.finish()
    finally:
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=RESUME"], check=True)
    log = launch.task_log()
    assert "#SBATCH --nodes=1-2" in next((tmp_path / "min_nodes" / "submitit").glob("*_submission.sh")).read_text()
    assert places(log) == [("0", "1", "node1", socket.gethostbyname("node1"), "0", "node1")], tail(log, 60)
    assert json.loads((launch.final_checkpoint() / "complete.json").read_text())["world_size"] == 1


def _revive_node2() -> None:
    subprocess.run(["ip", "link", "set", f"llip{MN_PORT_BASE}n2", "up"], capture_output=True)
    subprocess.run(["scontrol", "update", "NodeName=node2", "State=RESUME"], capture_output=True)
    _start_two_nodes()  # starts node2's slurmd again; waits until both nodes are usable


# Last: it takes node2 down and brings it back.
def test_losing_a_node_requeues_the_job_on_the_node_left_and_resumes(two_nodes, demo_data, tmp_path):
    """node2 dies right after the step-4 checkpoint: its processes killed, its link down, and
    Slurm told so (as slurmctld finds out by itself after SlurmdTimeout). Slurm ends the attempt
    (NODE_FAIL) and requeues the job; shrunk to the one node left, it comes back on node1 as one
    rank, resumes the step-4 checkpoint on that world size and trains to the end on the same data
    as the uninterrupted 2-node run, with the same global batch."""
    holds = Holds(tmp_path / "holds", ("after-checkpoint", 0))
    # A short distributed.timeout_minutes: rank 0, whose peer vanished without closing its
    # connection, gives up after a minute, so the attempt ends well before Slurm's KillWait.
    launch = NodesLaunch(demo_data, tmp_path / "node_lost", env=holds.env(),
                         extra=[*TWO_NODES, *KEYS, *evaluation(demo_data), "distributed.timeout_minutes=1"])
    try:
        holds.wait_held(launch, "after-checkpoint", 0)  # both ranks, the step-4 checkpoint complete
        assert newest_complete(launch.run_dir) == 4
        namespace = f"llip{MN_PORT_BASE}-node2"
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        assert pids, f"no process in {namespace}"
        for pid in pids:  # slurmd, the job's step daemon, rank 1 and its DataLoader worker
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "link", "set", f"llip{MN_PORT_BASE}n2", "down"], check=True)
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=DOWN", "Reason=lost"], check=True)
        wait_until("Slurm giving up the attempt", lambda: launch.state() != "RUNNING", launch.proc)
        holds.release("after-checkpoint", 0)
        wait_until("the requeue", lambda: launch.state() == "PENDING", launch.proc)
        # The job asks for 2 nodes: let it start on the one left (what launcher.min_nodes asks
        # of a scheduler that offers fewer nodes; Slurm 22.05 starts a node range on its minimum).
        subprocess.run(["scontrol", "update", f"JobId={launch.job_id}", "NumTasks=1", "NumNodes=1"], check=True)
        out = launch.finish()
    finally:
        _revive_node2()
    log = launch.task_log()
    assert requeued(out), tail(out)
    assert "DUE TO NODE FAILURE" in log, tail(log, 60)
    assert "checkpoints/step_0000000004 (step 4)" in log, tail(log, 60)
    # The second attempt ran one rank on node1, which resumed the 2-rank checkpoint.
    assert ("0", "1", "node1", socket.gethostbyname("node1"), "0", "node1") in places(log), tail(log, 60)
    assert "resumed step 4 on 1 ranks (was 2): micro batch 8 (was 4), accum 1, global batch 8 unchanged" in log, \
        tail(log, 60)
    assert json.loads((launch.final_checkpoint() / "complete.json").read_text())["world_size"] == 1
    # The same data from the resume on, losses within fp32 reduction noise, weights close.
    digests = {run: {m["step"]: m["data/keys_digest"] for m in metrics(run.run_dir) if "data/keys_digest" in m}
               for run in (launch, two_nodes)}
    assert [digests[launch][s] for s in range(5, 13)] == [digests[two_nodes][s] for s in range(5, 13)]
    losses = {run: {m["step"]: m["train/loss"] for m in metrics(run.run_dir) if "train/loss" in m}
              for run in (launch, two_nodes)}
    assert sorted(losses[launch]) == sorted(losses[two_nodes])
    for step, want in losses[two_nodes].items():
        assert abs(losses[launch][step] - want) <= 1e-5 * abs(want), (step, losses[launch][step], want)
    got, want = (consolidated_state_dict(run.final_checkpoint()) for run in (launch, two_nodes))
    assert weight_differences(got, want, lr=1e-3, steps=8, rel=1e-5) == []
