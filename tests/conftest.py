"""Test session setup.

Without a GPU the Triton kernels run in the interpreter. Triton reads TRITON_INTERPRET when a
kernel is defined, so it is set here, before any test module imports the kernels; with a GPU the
same tests run the compiled kernels.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
