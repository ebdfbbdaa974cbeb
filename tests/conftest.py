"""Test session setup.

Without a GPU the Triton kernels run in the interpreter. Triton reads TRITON_INTERPRET when a
kernel is defined, so it is set here, before any test module imports the kernels; with a GPU the
same tests run the compiled kernels.

With ``LLIP_REQUIRE_GPU_KERNELS=1`` (set by tools/gpu_check.sh) a skipped test or module is
reported as a failure: on a GPU machine a kernel test that does not run must not pass as a skip
(a missing import, an absent device or an unmet condition all show up as failures with the
reason).
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REQUIRE_ENV = "LLIP_REQUIRE_GPU_KERNELS"


def require_gpu_kernels() -> bool:
    return os.environ.get(REQUIRE_ENV, "0") not in ("", "0")


def _skip_to_failure(report, where: str) -> None:
    if not (report.skipped and require_gpu_kernels()) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"{where} skipped while {REQUIRE_ENV}=1: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _skip_to_failure(outcome.get_result(), item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _skip_to_failure(outcome.get_result(), collector.nodeid)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo set from tools/make_demo_data.py (128 training scenes in 2 shards, its
    tokenizer, 64 zero-shot and 24 retrieval images); read-only for the tests."""
    from _train_helpers import REPO, run_env

    out = tmp_path_factory.mktemp("demo_data")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), str(out), "--train", "128",
                    "--per-shard", "64", "--eval-zeroshot", "64", "--eval-retrieval", "24"],
                   cwd=REPO, env=run_env(), check=True, capture_output=True)
    return out
