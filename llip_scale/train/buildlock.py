"""Stale locks of run-time extension builds (DeepSpeed ops built by torch.utils.cpp_extension).

torch builds an extension under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)
``/<python>_<cpu|cuXY>/<name>/`` while holding ``<name>/lock``: a file created exclusively and
kept open by the builder until it removes it. A process killed during the build (a preempted
job, a timed-out test) leaves the file behind, and every later build or load of that extension
on the machine waits for it forever, printing nothing.

Flow: before DeepSpeed starts (which may build its communication op), :func:`clear_stale_locks`
finds each ``lock`` file no live process of this machine holds open (``/proc/*/fd``) — twice, a
second apart, since torch closes a lock just before it removes it — removes it and reports it in
one line. A lock that some process holds open is a build in progress and is
left alone. The check sees this machine only: keep the extension folder on a node-local disk
when jobs of several nodes share a home folder (``TORCH_EXTENSIONS_DIR``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional


def extensions_root() -> Path:
    """Where torch builds extensions (the folder above its per-Python/CUDA folders)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "torch_extensions"


def _lock_files(root: Path) -> list[Path]:
    # <root>/<name>/lock with TORCH_EXTENSIONS_DIR, <root>/<py>_<cu>/<name>/lock by default
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def _open_files() -> set[str]:
    """Every file some process of this machine holds open (what /proc lets us read)."""
    held: set[str] = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            entries = list(fd_dir.iterdir())
        except OSError:  # the process ended, or it is not ours to read
            continue
        for entry in entries:
            try:
                held.add(os.readlink(entry))
            except OSError:
                continue
    return held


def _unheld(locks: list[Path]) -> list[Path]:
    held = _open_files()
    return [lock for lock in locks if lock.exists() and str(lock.resolve()) not in held and str(lock) not in held]


def _inode(path: Path) -> Optional[int]:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def clear_stale_locks(root: Optional[Path] = None, report: Optional[Callable[[str], None]] = None,
                      settle_s: float = 1.0) -> list[Path]:
    """Remove the build locks no live process holds; return them. Needs /proc (Linux)."""
    root = extensions_root() if root is None else Path(root)
    locks = _lock_files(root) if root.is_dir() else []
    if not locks or not Path("/proc/self/fd").is_dir():
        return []
    stale = _unheld(locks)
    if stale:
        # torch closes the lock before removing it: a lock released just now looks unheld for an
        # instant. One still there, the same file and still unheld a moment later, is stale.
        first = {lock: _inode(lock) for lock in stale}
        time.sleep(settle_s)
        stale = [lock for lock in _unheld(stale) if _inode(lock) == first[lock] is not None]
    for lock in stale:
        lock.unlink(missing_ok=True)
        if report is not None:
            report(f"removed the stale build lock {lock}: no process holds it (a start killed while building "
                   f"the '{lock.parent.name}' extension left it); the extension is built again")
    return stale

