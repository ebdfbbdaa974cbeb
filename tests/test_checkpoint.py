"""Checkpoint folders without an engine: completeness checks, retention, RNG state round trip.

(Saving and resuming through DeepSpeed is covered end to end in test_train_resume.py, export
in test_train_equivalence.py.)
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llip_scale.checkpoint import (MARKER, ResumeError, export, list_checkpoints, problem, prune, rng_state,
                                   set_rng_state, step_tag)


def fake_checkpoint(run: Path, step: int, complete: bool = True, world: int = 2) -> Path:
    path = run / "checkpoints" / step_tag(step)
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(b"x" * 100)
    (path / "train_state_rank00000.pt").write_bytes(b"y" * 10)
    if complete:
        files = {"model.pt": 100, "train_state_rank00000.pt": 10}
        (path / MARKER).write_text(json.dumps({"step": step, "world_size": world, "files": files}))
    return path


def test_complete_checkpoint_has_no_problem(tmp_path):
    assert problem(fake_checkpoint(tmp_path, 10), world_size=2) is None


def test_missing_marker_means_an_interrupted_write(tmp_path):
    assert "no completion marker" in problem(fake_checkpoint(tmp_path, 10, complete=False))


def test_truncated_or_missing_files_are_named(tmp_path):
    path = fake_checkpoint(tmp_path, 10)
    (path / "model.pt").write_bytes(b"x" * 40)
    assert problem(path) == "model.pt has 40 bytes where 100 were written"
    (path / "model.pt").unlink()
    assert problem(path) == "model.pt is missing"


def test_unreadable_marker(tmp_path):
    path = fake_checkpoint(tmp_path, 10)
    (path / MARKER).write_text("{not json")
    assert "completion marker is unreadable" in problem(path)


def test_other_world_size_stops_the_resume(tmp_path):
    with pytest.raises(ResumeError, match="written by 4 ranks but this run has 2; rerun with 4 ranks"):
        problem(fake_checkpoint(tmp_path, 10, world=4), world_size=2)


def test_list_is_newest_first_and_ignores_other_names(tmp_path):
    for step in (5, 20, 10):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "step_0000000030.skipped").mkdir()
    (tmp_path / "checkpoints" / "zero_to_fp32.py").write_text("")
    assert [f.step for f in list_checkpoints(tmp_path)] == [20, 10, 5]
    assert list_checkpoints(tmp_path / "nothing") == []


def test_retention_keeps_the_newest_complete_ones(tmp_path):
    for step in (10, 20, 30, 40):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 35, complete=False)  # a write that died
    fake_checkpoint(tmp_path, 50, complete=False)  # newer than the current step: left alone
    removed = prune(tmp_path, keep_last=2, current=40)
    assert sorted(p.name for p in removed) == [step_tag(10), step_tag(20), step_tag(35)]
    assert [f.step for f in list_checkpoints(tmp_path)] == [50, 40, 30]


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_export_refuses_an_incomplete_checkpoint(tmp_path):
    with pytest.raises(ResumeError, match="no completion marker"):
        export(fake_checkpoint(tmp_path, 10, complete=False), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "out")
