"""What a user sees when something is wrong, through the real command line: one line naming the
problem and the fix, a non-zero exit status, no traceback; and a log file that fills as it goes.

Config problems are found before any process starts. The shard case runs two ranks through
``llip-train --nproc 2`` (torchrun in that process), so the torchrun wrapper's own report is
covered too.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from _train_helpers import HANG_LIMIT_S, PYTHON, REPO, run, run_env, tail, wait_for, write_config
from shardgen import caption, make_tokenizer, write_tar


def llip_train(*args: str) -> subprocess.CompletedProcess:
    return run([PYTHON, "-m", "llip_scale.train", *map(str, args)])


def assert_one_line(out: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    err = out.stderr.strip()
    assert out.returncode == code, tail(out.stdout + out.stderr)
    assert "Traceback" not in out.stdout + out.stderr and "\n" not in err, err
    for phrase in phrases:
        assert phrase in err, err


@pytest.fixture
def config(tmp_path) -> Path:
    return write_config(tmp_path / "config.yaml")


@pytest.mark.slow  # a llip-train process each, as the three below
def test_a_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("steps: 3  # caf\u00e9\n".encode("latin-1"))
    assert_one_line(llip_train(path), 2, f"{path}: not UTF-8 text (byte 0xe9", "save the file as UTF-8")


@pytest.mark.slow
def test_a_config_path_that_is_a_folder(tmp_path):
    assert_one_line(llip_train(tmp_path), 2, f"config path '{tmp_path}' is a folder; pass a YAML file")


@pytest.mark.slow
@pytest.mark.parametrize("run_dir", ["taken", "taken/run"])
def test_a_run_dir_that_is_an_existing_file(config, tmp_path, run_dir):
    (tmp_path / "taken").write_text("not a folder")
    out = llip_train(config, f"run_dir={tmp_path / run_dir}")
    assert_one_line(out, 2, f"'{tmp_path / 'taken'}' is an existing file, not a folder; choose another run_dir")
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_every_wrong_override_is_reported(config):
    out = llip_train(config, "model.vison.width=3", "steps=0", "optim.lr=fast", "seed=1")
    assert_one_line(out, 2, "3 problems: unknown config key 'model.vison'; did you mean 'model.vision'?",
                    "steps must be >= 1", "optim.lr: expected a number, got 'fast'")


def test_a_batch_that_does_not_split_over_the_ranks_stops_before_any_process_starts(config, tmp_path):
    out = llip_train(config, f"run_dir={tmp_path / 'run'}", "batch_size=7", "--nproc", "2")
    assert_one_line(out, 2, "batch_size=7 is not divisible by the 2 ranks; set batch_size to a multiple of 2")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_shards_that_are_all_bad_end_in_one_line_per_rank(config, tmp_path):
    shards = tmp_path / "shards"
    for s in range(2):
        write_tar(shards / f"bad-{s}.tar", [m for i in range(40) for m in (
            (f"{s}{i:08d}.png", b"not an image"), (f"{s}{i:08d}.txt", caption(i).encode()))])
    make_tokenizer(shards)
    out = llip_train(config, f"run_dir={tmp_path / 'run'}", "data.source=webdataset", f"data.shards={shards}",
                     f"data.tokenizer={shards / 'tok.model'}", "data.workers=1", "data.skip_check_after=10",
                     "--nproc", "2")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr, tail(out.stdout + out.stderr)
    errors = [line for line in lines if ": data error: " in line]
    assert errors and all("fix or remove that shard, or raise data.max_skip_rate" in e for e in errors), lines
    assert not any("ChildFailedError" in line or "exitcode" in line for line in lines), lines


@pytest.mark.slow
def test_a_log_file_receives_each_progress_line_as_it_happens(config, tmp_path):
    env = run_env()
    env.pop("PYTHONUNBUFFERED")
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([PYTHON, "-m", "llip_scale.train", str(config), f"run_dir={tmp_path / 'run'}",
                                 "steps=100000", "checkpoint.every=0"], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: "step 2/100000" in log.read_text(), "the second progress line",
                 gone=lambda: proc.poll() is not None)
        assert proc.poll() is None, "the lines came only when the run ended"
    finally:
        proc.kill()
        proc.wait(timeout=HANG_LIMIT_S)


def test_the_demo_checks_the_batch_split_before_training(demo_data, tmp_path):
    paths = [f"data.shards={demo_data / 'train'}", f"data.tokenizer={demo_data / 'tokenizer.model'}",
             f"eval.zeroshot_dir={demo_data / 'eval'}", f"eval.retrieval_dir={demo_data / 'eval'}"]
    out = run([PYTHON, "-m", "llip_scale.demo", "--data", str(demo_data), "--nproc", "2",
               f"run_dir={tmp_path / 'run'}", "batch_size=63", *paths])
    assert_one_line(out, 2, "demo: config error: batch_size=63 is not divisible by the 2 ranks")
    assert not (tmp_path / "run").exists()


def test_the_demo_says_what_the_rest_of_the_run_should_take(tmp_path):
    from llip_scale.config import load_config
    from llip_scale.demo import IDLE_STEPS_PER_S, expected_time

    cfg = load_config(None, [f"run_dir={tmp_path}", "steps=600"])
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n{"step": 240}\n')
    minutes = round(360 / IDLE_STEPS_PER_S / 60 + 1)
    assert expected_time(cfg, 2) == (
        f"demo: training steps 241-600 in 2 process(es): about {minutes} min on two otherwise idle cores; "
        "other work on the machine stretches it (the progress lines give the ETA)")
