"""The pair kernels compile for Hopper (sm_90) and Ampere (sm_80) on any machine: Triton lowers
them to PTX and the bundled ptxas assembles it, which catches what the interpreter cannot
(constexpr rules, layouts, register and shared-memory limits)."""
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
def test_chosen_kernels_compile_for_sm90_and_sm80_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    # The configs the backend launches for the tiny model's head (K=8, E=128, H=4) in every dtype,
    # with every pointer 16-byte aligned and with the per-pair buffers not, through the same path
    # as the zoo's table in benchmarks/RESULTS.md.
    cmd = [sys.executable, os.path.join(ROOT, "tools", "kernel_resources.py"), "--chosen", "--models", "tiny",
           "--fwd-modes", "scores", "loss", "loss_stats", "--arch", "90", "80", "--jobs", "2", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_LIMIT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = ["fwd/scores", "fwd/loss", "fwd/loss_stats", "bwd_image", "bwd_text"]
    got = sorted((r["kernel"] + (f"/{r['mode']}" if "mode" in r else ""), r["arch"], r["dtype"], r["aligned"])
                 for r in rows)
    assert got == sorted((k, a, d, al) for a in (90, 80) for k in kernels for d in ("bfloat16", "float16", "float32")
                         for al in (True, False))
    for r in rows:
        assert "error" not in r, r
        assert r["model"] == "tiny", r
        assert 0 < r["registers"] <= 255 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["shared_bytes"] < 160 * 1024, r  # within an A100's shared memory per block
