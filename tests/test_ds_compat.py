"""Each private DeepSpeed read of llip_scale.checkpoints.ds_compat, on a live one-rank engine,
against DeepSpeed's public getters: a DeepSpeed release that moves one fails here by name."""
from __future__ import annotations

import pytest
from _train_helpers import PYTHON, REPO, run, tail, write_config


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_private_reads_agree_with_deepspeeds_public_getters(tmp_path, stage):
    cfg = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"))
    out = run([PYTHON, str(REPO / "tests" / "_ds_compat_worker.py"), str(cfg), str(stage)])
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), tail(out.stdout + out.stderr)
