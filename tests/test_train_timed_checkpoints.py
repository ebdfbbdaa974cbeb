"""Timed checkpoints (``checkpoint.every_minutes``) through the real entry point, 2 ranks.

Rank 0's clock decides and the decision travels with the per-step all-reduce, so both ranks save
at the same steps: each of those checkpoints is complete (its marker lists both ranks' files)
and training is unchanged by them (the final checkpoint equals the one of a run without them).
"""
from __future__ import annotations

import json

import pytest
from _train_helpers import checkpoint_differences, run, tail, train_command, write_config

pytestmark = pytest.mark.slow  # two runs of two processes


def test_timed_checkpoints_are_taken_together_and_change_nothing(tmp_path):
    config = write_config(tmp_path / "config.yaml", steps=4, checkpoint={"every": 0, "keep_last": 10})
    runs = {}
    # A due time that has always passed: rank 0 asks for a save after every step.
    for name, minutes in (("timed", "1e-9"), ("plain", "0")):
        out = run(train_command(config, [f"run_dir={tmp_path / name}", f"checkpoint.every_minutes={minutes}"]))
        assert out.returncode == 0, tail(out.stdout + out.stderr)
        runs[name] = sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir())
    assert runs["timed"] == [f"step_{s:010d}" for s in (1, 2, 3, 4)], runs
    assert runs["plain"] == ["step_0000000004"], runs
    for step in (1, 2, 3, 4):
        marker = json.loads((tmp_path / "timed" / "checkpoints" / f"step_{step:010d}" / "complete.json").read_text())
        assert marker["world_size"] == 2
    final = "checkpoints/step_0000000004"
    assert checkpoint_differences(tmp_path / "timed" / final, tmp_path / "plain" / final) == \
        ["config.yaml.checkpoint.every_minutes: 1e-09 != 0.0"]
