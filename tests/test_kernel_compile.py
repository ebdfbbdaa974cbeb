"""The pair kernels compile for Hopper (sm_90) on any machine: Triton lowers them to PTX and the
bundled ptxas assembles it, which catches what the interpreter cannot (constexpr rules, layouts,
register and shared-memory limits)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _train_helpers import HANG_LIMIT_S

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@pytest.mark.skipif(not any(os.path.exists(os.path.join(PTXAS, n)) for n in ("ptxas", "ptxas-blackwell")),
                    reason="needs the ptxas bundled with triton's CUDA backend")
def test_forward_and_backward_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    # The tiny model's head (K=8, E=128, H=4): 4 blocks, so the static unrolling stays small.
    cmd = [sys.executable, os.path.join(ROOT, "tools", "kernel_resources.py"), "--shape", "8,128,4", "--bt", "16",
           "--warps", "4", "--dtype", "float16", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_LIMIT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["kernel"] for r in rows] == ["fwd", "bwd"]
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["registers"] <= 255 and r["spill_stores"] == 0, r
        assert r["shared_bytes"] < 228 * 1024, r  # an H100's shared memory per block
