"""An L/14-shaped Llip (full widths, K=32, reduced depth) trains under 2-rank ZeRO-3 on the CPU."""
from __future__ import annotations

import math

import pytest
from _train_helpers import REPO, metrics, newest_complete, run, tail, train_command, write_config

pytestmark = pytest.mark.slow


def test_l14_shaped_zero3_trains_a_few_steps(tmp_path):
    config = write_config(
        tmp_path / "config.yaml", base=str(REPO / "configs" / "models" / "l14.yaml"), steps=3, batch_size=4,
        model={"vision": {"depth": 2}, "text": {"depth": 2, "vocab_size": 1024, "context_length": 16, "eot_id": 2},
               "head": {"embed_dim": 768, "num_heads": 8}},
        checkpoint={"every": 3, "keep_last": 1}, eval={"heldout_samples": 0},
        distributed={"zero_stage": 3})
    out = run(train_command(config, [f"run_dir={tmp_path / 'run'}"]))
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    losses = [m["train/loss"] for m in metrics(tmp_path / "run") if "train/loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert newest_complete(tmp_path / "run") == 3
