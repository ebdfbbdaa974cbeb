"""tools/gpu_check.sh gives one verdict: no pass from skipped tests, a missing device, missing
profile rows or a step cut off at its limit (checked here without a GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="0"
skipped="{skipped}" tests="3" time="9.0"><testcase classname="tests.test_kernel_gpu" name="test_a" time="4.0"/>
<testcase classname="tests.test_kernel_gpu" name="test_b" time="3.0">{extra}</testcase>
<testcase classname="tests.test_kernel_pairs" name="test_c" time="2.0"/></testsuite></testsuites>"""
SKIP = '<skipped type="pytest.skip" message="could not import \'llip_scale.kernels.pairs\'">skip</skipped>'
ROW = dict(backend="triton", bi=256, bt=4096, k=32, e=512, h=8, dtype="bfloat16", backward=True, time_ms=1.0,
           tflops=100.0, peak_mb=10.0, extra_mb=5.0, inputs_mb=80.0, repeatable=True)
STEPS = ["tests:0:90:190", "profile:0:120:200"]


def _out_dir(tmp_path, skipped=0, rows=(ROW,)):
    (tmp_path / "tests.xml").write_text(JUNIT.format(skipped=skipped, extra=SKIP if skipped else ""))
    peak = dict(device="cuda", device_name="H100", dtype="bfloat16", n=8192, tflops=700.0)
    (tmp_path / "profile.json").write_text(json.dumps(dict(command="x", device="cuda", matmul_peak=peak,
                                                           rows=list(rows))))
    return tmp_path


def _verdict(out, capsys, steps=STEPS, expected=1):
    args = [str(out), "--expected-rows", str(expected)] + [a for s in steps for a in ("--step", s)]
    rc = gpu_check.main(["verdict", *args])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines  # one line, whatever the outcome
    return rc, lines[0]


def test_all_passed_and_measured_is_a_pass(tmp_path, capsys):
    rc, line = _verdict(_out_dir(tmp_path), capsys)
    assert rc == 0 and line.startswith("PASS: 3 kernel tests passed"), line
    text = (tmp_path / "results.md").read_text()
    assert "PASS" in text and "bitwise repeatable" in text and "700.00 TFLOP/s" in text


def test_a_skipped_kernel_test_is_a_failure(tmp_path, capsys):
    rc, line = _verdict(_out_dir(tmp_path, skipped=1), capsys)
    assert rc == 1 and line.startswith("FAIL: 1 kernel test(s) skipped: first tests.test_kernel_gpu::test_b"), line
    assert "could not import" in line


def test_a_step_past_its_limit_is_named_first(tmp_path, capsys):
    rc, line = _verdict(_out_dir(tmp_path), capsys, steps=["tests:124:190:190", "profile:0:10:20"])
    assert rc == 1 and line.startswith("FAIL: step tests ran past its limit of 190 s"), line


def test_missing_or_failed_profile_rows_fail(tmp_path, capsys):
    rc, line = _verdict(_out_dir(tmp_path), capsys, expected=8)
    assert rc == 1 and "profile has 1 of 8 rows" in line
    bad = [dict(ROW, repeatable=False), dict(ROW, backward=False, error="timed out after 50 s")]
    rc, line = _verdict(_out_dir(tmp_path, rows=bad), capsys, expected=2)
    assert rc == 1 and "gradients differ between two runs" in line and "+1 more" in line
    (tmp_path / "tests.xml").unlink()
    rc, line = _verdict(tmp_path, capsys, expected=2)
    assert rc == 1 and "no junit XML" in line


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLIP_REQUIRE_GPU_KERNELS")}
    return dict(env, **extra)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_required_kernel_tests_fail_instead_of_skipping(tmp_path):
    """LLIP_REQUIRE_GPU_KERNELS=1 (what gpu_check.sh sets): the GPU tests, which skip without
    CUDA, fail instead, and the junit XML counts them as failures."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernel_gpu.py",
           "--junitxml", str(tmp_path / "j.xml")]
    plain = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0 and "skipped" in plain.stdout, plain.stdout[-1000:]
    required = subprocess.run(cmd, cwd=ROOT, env=_env(LLIP_REQUIRE_GPU_KERNELS="1"), capture_output=True, text=True,
                              timeout=600)
    assert required.returncode == 1, required.stdout[-2000:]
    summary = gpu_check.junit_summary(str(tmp_path / "j.xml"))
    # a skip in setup (skipif) is reported as an error of the setup, one at run time as a failure
    assert summary["tests"] > 0 and summary["failures"] + summary["errors"] == summary["tests"]
    assert summary["skipped"] == 0
    assert "skipped while LLIP_REQUIRE_GPU_KERNELS=1: needs CUDA" in (tmp_path / "j.xml").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_check_without_cuda_fails_with_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), str(out)], env=_env(PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stdout.strip().splitlines()[-1].split("] ", 1)[1]]
    assert proc.stderr.startswith("FAIL: no CUDA device visible to"), proc.stderr
    assert len(os.listdir(out)) < 8


def test_imports_without_cuda_come_from_this_checkout():
    """What the GPU check imports, imported the way gpu_check.sh does (checkout on PYTHONPATH)."""
    env = _env(PYTHONPATH=f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'tools', 'source_tree')}")
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "imports"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.startswith("device: ")
