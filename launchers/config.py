"""Launcher config: where and how a training run is started (Slurm or this machine)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from llip_scale.errors import ConfigError

_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def _fail(message: str) -> None:
    raise ConfigError(message)


def parse_slurm_time(value: str) -> int:
    """Slurm time limit -> minutes. Accepts M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (as sbatch does)."""
    m = _TIME.match(str(value).strip())
    if not m:
        _fail(f"launcher.time '{value}' is not a Slurm time; use e.g. 90, 04:00:00 or 2-00:00:00")
    days, a, b, c = (int(x) if x is not None else None for x in m.group("days", "a", "b", "c"))
    if days is None:
        if b is None:
            minutes = a  # M
        elif c is None:
            minutes = a + (b > 0)  # M:S, seconds rounded up
        else:
            minutes = 60 * a + b + (c > 0)  # H:M:S
    else:
        minutes = 24 * 60 * days + 60 * a + (b or 0) + ((c or 0) > 0)  # D-H[:M[:S]]
    if minutes < 1:
        _fail(f"launcher.time '{value}' is shorter than a minute")
    return minutes


@dataclass
class LauncherConfig:
    kind: Literal["local", "slurm"] = "local"
    local_mode: Literal["submitit", "torchrun"] = "submitit"  # how `local` starts its processes
    nodes: int = 1
    # Slurm may start the job on fewer nodes, down to this many (sbatch --nodes=MIN-MAX); 0: exactly
    # `nodes`. Each start's world size is then the nodes it got times the tasks per node.
    min_nodes: int = 0
    gpus_per_node: int = 0  # Slurm: one task per GPU; 0 means CPU tasks
    tasks_per_node: int = 1  # used when gpus_per_node is 0 (and for local runs)
    cpus_per_task: int = 8
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time: str = "72:00:00"
    mem_gb: int = 0  # per node; 0 leaves the cluster default
    signal_delay_s: int = 120  # USR2 this long before the time limit: must fit one checkpoint save
    max_requeues: int = 10  # time-outs after which the job is not requeued again
    job_name: str = "llip"
    sbatch_extra: dict = field(default_factory=dict)  # more #SBATCH directives, e.g. {exclusive: true}
    setup: list = field(default_factory=list)  # shell lines run before srun (modules, env)

    def validate(self, name: str) -> None:
        if self.nodes < 1:
            _fail(f"{name}.nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0 or self.tasks_per_node < 1 or self.cpus_per_task < 1:
            _fail(f"{name}: gpus_per_node must be >= 0, tasks_per_node and cpus_per_task >= 1")
        if self.signal_delay_s < 0 or self.max_requeues < 0:
            _fail(f"{name}: signal_delay_s and max_requeues must be >= 0")
        minutes = parse_slurm_time(self.time)
        if self.signal_delay_s >= 60 * minutes:
            _fail(f"{name}.signal_delay_s={self.signal_delay_s} is not shorter than {name}.time={self.time}")
        if self.kind == "local" and self.nodes != 1:
            _fail(f"{name}.nodes={self.nodes} needs {name}.kind=slurm; a local launch runs on one machine")
        if not 0 <= self.min_nodes <= self.nodes:
            _fail(f"{name}.min_nodes={self.min_nodes} must be between 1 and {name}.nodes={self.nodes} "
                  "(0 asks for exactly nodes)")

    @property
    def node_counts(self) -> range:
        """The node counts the job may start with: min_nodes..nodes (just nodes by default)."""
        return range(self.min_nodes or self.nodes, self.nodes + 1)

    @property
    def tasks(self) -> int:
        """Processes per node: one per GPU, else tasks_per_node."""
        return self.gpus_per_node or self.tasks_per_node

    @property
    def minutes(self) -> int:
        return parse_slurm_time(self.time)
