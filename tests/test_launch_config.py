"""Launcher settings: Slurm time parsing, dry-run sbatch script, errors before submission."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _train_helpers import HANG_LIMIT_S

from llip_scale.config import ConfigError, load_config
from llip_scale.launchers.config import parse_slurm_time
from llip_scale.launchers.launch import dry_run


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("10:30", 11), ("04:00:00", 240), ("1-00", 1440), ("2-03:30", 2 * 1440 + 210),
    ("1-00:00:01", 1441),
])
def test_slurm_time_formats(text, minutes):
    assert parse_slurm_time(text) == minutes


def test_dry_run_sbatch_has_the_requested_resources(tmp_path):
    cfg = load_config("models/tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", "launcher.kind=slurm", "launcher.nodes=4", "launcher.gpus_per_node=8",
        "launcher.cpus_per_task=10", "launcher.partition=learn", "launcher.account=vision", "launcher.qos=high",
        "launcher.constraint=h100", "launcher.time=2-00:00:00", "launcher.signal_delay_s=300",
        "launcher.mem_gb=512", "launcher.sbatch_extra={exclusive: true, mail-type: END}"])
    script = dry_run(cfg)
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --partition=learn", "#SBATCH --account=vision",
                 "#SBATCH --qos=high", "#SBATCH --constraint=h100", "#SBATCH --time=2880",
                 "#SBATCH --signal=USR2@300", "#SBATCH --mem=512GB", "#SBATCH --exclusive",
                 "#SBATCH --mail-type=END", "SUBMITIT_PREEMPT_SIGNAL=USR2", "srun"]:
        assert line in script, f"missing {line!r} in\n{script}"
    assert f"PYTHONPATH={tmp_path / 'run' / 'code'}" in script
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_min_nodes_asks_slurm_for_a_node_range(tmp_path):
    cfg = load_config("models/tiny.yaml", [f"run_dir={tmp_path / 'run'}", "launcher.kind=slurm", "launcher.nodes=4",
                                           "launcher.min_nodes=2", "launcher.tasks_per_node=2"])
    script = dry_run(cfg)
    assert "#SBATCH --nodes=2-4" in script and "#SBATCH --nodes=4\n" not in script, script
    assert list(cfg.launcher.node_counts) == [2, 3, 4]
    exact = load_config("models/tiny.yaml", [f"run_dir={tmp_path / 'run'}", "launcher.kind=slurm", "launcher.nodes=4"])
    assert "#SBATCH --nodes=4\n" in dry_run(exact) and list(exact.launcher.node_counts) == [4]


def test_each_attempt_runs_tasks_per_node_on_every_node_it_got(tmp_path):
    """The batch script sets srun's task count from the nodes Slurm gave this attempt."""
    cfg = load_config("models/tiny.yaml", [f"run_dir={tmp_path / 'run'}", "launcher.kind=slurm", "launcher.nodes=4",
                                           "launcher.min_nodes=2", "launcher.tasks_per_node=2"])
    line = next(line for line in dry_run(cfg).splitlines() if "SLURM_NTASKS=" in line)
    for nodes, tasks in ((4, 8), (3, 6), (2, 4)):
        out = subprocess.run(["bash", "-c", f"{line}; echo $SLURM_NTASKS $SLURM_NPROCS"], capture_output=True,
                             text=True, env={"SLURM_JOB_NUM_NODES": str(nodes), "PATH": os.environ["PATH"]})
        assert out.stdout.split() == [str(tasks)] * 2, (line, out.stdout, out.stderr)


def test_min_nodes_checks_the_batch_split_of_every_world_size(tmp_path, capsys):
    """batch_size=8 splits over 2 and 4 tasks but not over 3: refused before anything is written."""
    from llip_scale.launchers.launch import cli

    code = cli(["models/tiny.yaml", f"run_dir={tmp_path / 'run'}", "batch_size=8", "launcher.kind=slurm",
                "launcher.nodes=4", "launcher.min_nodes=2", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "not divisible by the 3 ranks" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("launcher.min_nodes=5", "launcher.min_nodes=5 must be between 1 and launcher.nodes="),
    ("distributed.timeout_minutes=0", "distributed.timeout_minutes must be > 0"),
    ("checkpoint.every_minutes=-1", "checkpoint.every_minutes must be >= 0"),
])
def test_bad_multinode_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("models/tiny.yaml", ["launcher.kind=slurm", "launcher.nodes=4", override])
    assert message in str(err.value)


@pytest.mark.slow  # a llip-launch process each
@pytest.mark.parametrize("override, message", [
    ("launcher.partiton=learn", "unknown config key 'launcher.partiton'; did you mean 'launcher.partition'?"),
    ("launcher.nodes=0", "launcher.nodes must be >= 1"),
    ("launcher.time=4h", "launcher.time '4h' is not a Slurm time"),
    ("launcher.signal_delay_s=7200", "launcher.signal_delay_s=7200 is not shorter than launcher.time=01:00:00"),
])
def test_bad_launcher_settings_fail_before_submission(override, message, tmp_path):
    extra = ["launcher.kind=slurm", "launcher.time=01:00:00"]
    with pytest.raises(ConfigError) as err:
        load_config("models/tiny.yaml", extra + [override])
    assert message in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "llip_scale.launchers.launch", "models/tiny.yaml", *extra, override,
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["data.shards="], "data.shards is empty"),
    (["data.shards={root}/missing-{{0..3}}.tar"], "4 of 4 shard(s) do not exist"),
    (["data.tokenizer={root}/missing.model"], "data.tokenizer: file"),
])
def test_inputs_are_checked_before_submitting(tmp_path, demo_data, capsys, overrides, message):
    """A wrong data or tokenizer path fails at once, not after the queue wait; nothing is written."""
    from llip_scale.launchers.launch import cli

    good = [f"data.shards={demo_data / 'train'}", f"data.tokenizer={demo_data / 'tokenizer.model'}",
            f"eval.zeroshot_dir={demo_data / 'eval'}", f"eval.retrieval_dir={demo_data / 'eval'}"]
    bad = [o.format(root=tmp_path) for o in overrides]
    for dry in ([], ["--dry-run"]):
        code = cli(["experiments/demo.yaml", f"run_dir={tmp_path / 'run'}", "launcher.kind=slurm", *good, *bad,
                    *dry])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if "config error" in line]) == 1
    assert not (tmp_path / "run").exists()


def test_a_slurm_job_without_gpus_is_warned_about(tmp_path, demo_data, capsys):
    from llip_scale.launchers.launch import cli

    args = ["experiments/demo.yaml", f"run_dir={tmp_path / 'run'}", "launcher.kind=slurm",
            f"data.shards={demo_data / 'train'}", f"data.tokenizer={demo_data / 'tokenizer.model'}",
            f"eval.zeroshot_dir={demo_data / 'eval'}", f"eval.retrieval_dir={demo_data / 'eval'}"]
    assert cli([*args, "--dry-run"]) == 0
    assert "warning: launcher.gpus_per_node=0: the Slurm job asks for no GPU" in capsys.readouterr().err
    assert cli([*args, "launcher.gpus_per_node=8", "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().err
