"""``llip-launch CONFIG [overrides] [--dry-run]``: start a training run on Slurm or locally.

config + overrides -> validated (the ``launcher`` section too) before anything is submitted ->
RUN/config.yaml and a code snapshot (RUN/code) -> one of:
  slurm            submitit AutoExecutor: nodes (or min_nodes-nodes) x tasks (one per GPU), USR2
                   ``signal_delay_s`` before the time limit, requeue on preemption/time-out;
  local/submitit   submitit LocalExecutor: N processes on this machine, same code path;
  local/torchrun   llip-train --nproc N RUN/config.yaml (torchrun in that process, errors in one line).
Relaunching the same config into the same run folder resumes it (newest complete checkpoint).
Before anything is written or submitted the data sources and the tokenizer are checked, so a
wrong path fails here rather than after the queue wait. ``--wait`` follows a Slurm job through
its requeues to its final state (exit 0 only for COMPLETED).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import submitit
from submitit.slurm.slurm import SlurmExecutor

from llip_scale.config import Config, ConfigError, batch_split, load_config, save_config
from llip_scale.data.build import check_data, tokenizer_from_config
from llip_scale.launchers.job import TrainJob
from llip_scale.launchers.slurm import wait_for_job
from llip_scale.launchers.snapshot import snapshot_code
from llip_scale.launchers.task import python_command

SUBMITIT_DIR = "submitit"


def _job_env(code_dir: Path) -> dict[str, str]:
    """PYTHONPATH with the snapshot first, and the preemption signals the trainer listens to."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{code_dir}{os.pathsep}{path}" if path else str(code_dir),
            "SUBMITIT_PREEMPT_SIGNAL": "USR2"}


def slurm_parameters(cfg: Config, code_dir: Path) -> dict:
    lc = cfg.launcher
    env = f"export PYTHONPATH={shlex.quote(str(code_dir))}${{PYTHONPATH:+:$PYTHONPATH}} SUBMITIT_PREEMPT_SIGNAL=USR2"
    # The step's task count follows the nodes this attempt got, not the count the job was first
    # submitted with: a job requeued after losing a node may come back on fewer (srun reads these).
    tasks = f"$(( ${{SLURM_JOB_NUM_NODES:-{lc.nodes}}} * {lc.tasks} ))"
    count = f"export SLURM_NTASKS={tasks} SLURM_NPROCS={tasks}"
    params = dict(name=lc.job_name, nodes=lc.nodes, tasks_per_node=lc.tasks, cpus_per_task=lc.cpus_per_task,
                  timeout_min=lc.minutes, slurm_signal_delay_s=lc.signal_delay_s,
                  slurm_setup=[*lc.setup, env, count], slurm_additional_parameters=dict(lc.sbatch_extra))
    if lc.min_nodes and lc.min_nodes < lc.nodes:
        params["slurm_additional_parameters"]["nodes"] = f"{lc.min_nodes}-{lc.nodes}"  # sbatch --nodes=MIN-MAX
    if lc.gpus_per_node:
        params["gpus_per_node"] = lc.gpus_per_node
    if lc.mem_gb:
        params["mem_gb"] = lc.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(lc, key):
            params[f"slurm_{key}"] = getattr(lc, key)
    return params


def slurm_executor(cfg: Config, run_dir: Path, code_dir: Path):
    ex = submitit.AutoExecutor(folder=run_dir / SUBMITIT_DIR, cluster="slurm",
                               slurm_max_num_timeout=cfg.launcher.max_requeues, slurm_python=python_command())
    ex.update_parameters(**slurm_parameters(cfg, code_dir))
    return ex


@contextlib.contextmanager
def _without_srun_check():
    """submitit refuses to build a Slurm executor where srun is missing; a dry run needs none."""

    original = SlurmExecutor.__dict__["affinity"]
    SlurmExecutor.affinity = classmethod(lambda cls: 2)
    try:
        yield
    finally:
        SlurmExecutor.affinity = original


def sbatch_script(cfg: Config, run_dir: Path, code_dir: Path) -> str:
    """The sbatch file submitit would submit for this config."""
    with _without_srun_check():
        inner = slurm_executor(cfg, run_dir, code_dir)._executor
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")


def local_executor(cfg: Config, run_dir: Path, code_dir: Path):
    lc = cfg.launcher
    ex = submitit.LocalExecutor(folder=run_dir / SUBMITIT_DIR, max_num_timeout=lc.max_requeues,
                                python=python_command())
    ex.update_parameters(tasks_per_node=lc.tasks, nodes=1, gpus_per_node=lc.gpus_per_node,
                         timeout_min=lc.minutes, signal_delay_s=lc.signal_delay_s)
    return ex


def torchrun_command(cfg: Config, config_path: Path) -> list[str]:
    return [sys.executable, "-m", "llip_scale.train", str(config_path), "--nproc", str(cfg.launcher.tasks)]


def prepare_run(cfg: Config) -> tuple[Path, Path, Path]:
    """Write RUN/config.yaml and the code snapshot; returns (run_dir, config_path, code_dir)."""

    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    save_config(cfg, config_path)
    return run_dir, config_path, snapshot_code(run_dir)


def check_inputs(cfg: Config) -> list[str]:
    """Fail (ConfigError) when the run could not read its data or tokenizer; return warnings."""

    check_data(cfg)
    tokenizer_from_config(cfg)
    lc = cfg.launcher
    if lc.kind == "slurm" and not lc.gpus_per_node:
        return [f"launcher.gpus_per_node=0: the Slurm job asks for no GPU and trains on {lc.tasks} CPU task(s) per "
                "node; set launcher.gpus_per_node (e.g. 8) to train on GPUs"]
    return []


def submit(cfg: Config):
    """Launch ``cfg`` as configured; returns the submitit job (or torchrun's exit code)."""

    run_dir, config_path, code_dir = prepare_run(cfg)
    if cfg.launcher.kind == "local" and cfg.launcher.local_mode == "torchrun":
        env = dict(os.environ, **_job_env(code_dir))
        return subprocess.run(torchrun_command(cfg, config_path), env=env).returncode
    if cfg.launcher.kind == "local":
        os.environ.update(_job_env(code_dir))  # LocalExecutor tasks inherit this environment
        job = local_executor(cfg, run_dir, code_dir).submit(TrainJob(str(config_path)))
    else:
        job = slurm_executor(cfg, run_dir, code_dir).submit(TrainJob(str(config_path)))
    print(f"submitted job {job.job_id}; run folder {run_dir}; logs in {run_dir / SUBMITIT_DIR}", flush=True)
    return job


def wait_for(job, cfg: Config) -> int:
    """Wait for a submitted job's final state; 0 when it completed."""
    if cfg.launcher.kind == "slurm":

        state = wait_for_job(job.job_id, report=lambda line: print(f"llip-launch: {line}", flush=True))
        if state != "COMPLETED":
            print(f"llip-launch: job {job.job_id} ended {state}; see the logs in {Path(cfg.run_dir) / SUBMITIT_DIR}",
                  file=sys.stderr)
        return 0 if state == "COMPLETED" else 1
    try:
        job.result()  # waits; raises what the job raised
    except Exception as e:  # noqa: BLE001 - any failure of the job is reported the same way
        print(f"llip-launch: job {job.job_id} failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    return 0


def dry_run(cfg: Config) -> str:
    """What would be submitted, without writing or submitting anything."""
    run_dir = Path(cfg.run_dir).resolve()
    code_dir = run_dir / "code"
    if cfg.launcher.kind == "slurm":
        return sbatch_script(cfg, run_dir, code_dir)
    if cfg.launcher.local_mode == "torchrun":
        return shlex.join(torchrun_command(cfg, run_dir / "config.yaml"))
    return (f"submitit LocalExecutor: {cfg.launcher.tasks} processes on this machine, time limit "
            f"{cfg.launcher.minutes} min, USR2 {cfg.launcher.signal_delay_s}s before it; run folder {run_dir}")


def cli(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="llip-launch", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--dry-run", action="store_true", help="print the job (for Slurm the sbatch script) and exit")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job's final state, through its requeues; exit 1 unless it completed")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        node_counts = cfg.launcher.node_counts if cfg.launcher.kind == "slurm" else [1]
        for nodes in node_counts:  # every world size the job may start with, before anything is submitted
            batch_split(cfg, nodes * cfg.launcher.tasks)
    except ConfigError as e:
        print(f"llip-launch: config error: {e}", file=sys.stderr)
        return 2
    try:
        warnings = check_inputs(cfg)
    except ConfigError as e:
        print(f"llip-launch: config error: {e}", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"llip-launch: warning: {line}", file=sys.stderr)
    if args.dry_run:
        print(dry_run(cfg))
        return 0
    result = submit(cfg)
    if isinstance(result, int):
        return result
    return wait_for(result, cfg) if args.wait else 0


if __name__ == "__main__":
    sys.exit(cli())
