"""Stale locks of run-time extension builds: found, removed with one line, never waited on."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _train_helpers import PYTHON, REPO, run_env, tail, write_config

from llip_scale.train import buildlock
from llip_scale.train.buildlock import clear_stale_locks, extensions_root


def _holder(lock: Path) -> subprocess.Popen:
    """A process that creates the lock as torch's builder does (exclusively) and keeps it open."""
    code = "import os, sys; os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_removes_only_the_locks_no_process_holds(tmp_path):
    stale = tmp_path / "py311_cpu" / "stale_op" / "lock"  # the default layout
    stale.parent.mkdir(parents=True)
    stale.touch()
    flat = tmp_path / "flat_op" / "lock"  # the TORCH_EXTENSIONS_DIR layout
    flat.parent.mkdir()
    flat.touch()
    busy = tmp_path / "py311_cpu" / "busy_op" / "lock"
    busy.parent.mkdir()
    holder = _holder(busy)
    try:
        lines: list[str] = []
        removed = clear_stale_locks(tmp_path, lines.append)
        assert sorted(removed) == sorted([stale, flat])
        assert not stale.exists() and not flat.exists() and busy.exists()
        assert len(lines) == 2 and all("stale build lock" in line for line in lines)
    finally:
        holder.communicate("")
    assert clear_stale_locks(tmp_path) == [busy]  # its holder has exited


def test_a_lock_released_meanwhile_is_left_to_its_holder(tmp_path, monkeypatch):
    """torch closes its lock, then removes it: caught in between, the lock looks unheld. Its
    holder removes it a moment later; it must not be reported (or removed under its holder)."""
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    lock.touch()  # closed by its holder, not yet removed
    monkeypatch.setattr(buildlock.time, "sleep", lambda _: lock.unlink())  # ... which the holder now does
    lines: list[str] = []
    assert clear_stale_locks(tmp_path, lines.append) == [] and lines == []


@pytest.mark.slow
def test_a_start_after_a_killed_build_does_not_hang(tmp_path):
    """The state a job killed while building DeepSpeed's op leaves behind: the extension folder
    with its lock file. The next start removes the lock (one line) and trains."""
    built = extensions_root()
    ext = tmp_path / "torch_extensions"
    if built.is_dir():
        shutil.copytree(built, ext, ignore=shutil.ignore_patterns("lock"))
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    config = write_config(tmp_path / "c.yaml", steps=2, eval={"heldout_samples": 0})
    env = dict(run_env(), TORCH_EXTENSIONS_DIR=str(ext))
    out = subprocess.run([PYTHON, "-m", "llip_scale.train", str(config), f"run_dir={tmp_path / 'run'}"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=1800)  # a hang guard only
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    assert f"removed the stale build lock {lock}" in out.stderr, tail(out.stderr)
    assert not lock.exists()


def test_default_root_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert extensions_root() == tmp_path / "cache" / "torch_extensions"
    assert os.fspath(extensions_root()).endswith("torch_extensions")
