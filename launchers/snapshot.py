"""Run-folder snapshot: the resolved config and the exact code a (requeued) job runs.

launch -> RUN/config.yaml (resolved) -> RUN/code/llip_scale/... (a copy of the installed package,
put first on PYTHONPATH of every job process, so a requeued job runs the code it started with)
-> RUN/code/version.txt (git commit, branch, dirty flag) and RUN/code/diff.patch (uncommitted
changes, if any) -> one line per launch appended to RUN/code/launches.txt.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import llip_scale
import llip_scale.configs
import llip_scale.kernels
import llip_scale.launchers

_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")


def _git(args: list[str], cwd: Path) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def package_sources() -> dict[str, Path]:
    """Installed package folders, keyed by their place inside the package."""

    root = Path(llip_scale.__file__).resolve().parent
    return {"": root, "kernels": Path(llip_scale.kernels.__file__).resolve().parent,
            "launchers": Path(llip_scale.launchers.__file__).resolve().parent,
            "configs": Path(llip_scale.configs.__file__).resolve().parent}


def code_version(src: Path) -> dict[str, str]:
    commit = _git(["rev-parse", "HEAD"], src).strip()
    if not commit:
        return {"commit": "unknown (not a git checkout)", "dirty": "unknown", "diff": ""}
    diff = _git(["diff", "HEAD"], src)
    branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], src).strip()
    return {"commit": commit, "branch": branch, "dirty": "yes" if diff else "no", "diff": diff}


def snapshot_code(run_dir: Path) -> Path:
    """Copy the package into RUN/code (replacing an older copy) and record its version."""
    code = run_dir / "code"
    pkg = code / "llip_scale"
    if pkg.exists():
        shutil.rmtree(pkg)
    sources = package_sources()
    shutil.copytree(sources[""], pkg, ignore=_IGNORE)
    for sub, src in sources.items():
        if sub and not (pkg / sub).exists():  # mapped folders (kernels/, launchers/, configs/)
            shutil.copytree(src, pkg / sub, ignore=_IGNORE)
    version = code_version(sources[""])
    (code / "version.txt").write_text("".join(f"{k}: {v}\n" for k, v in version.items() if k != "diff"))
    (code / "diff.patch").write_text(version["diff"])
    with open(code / "launches.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} commit={version['commit']} dirty={version['dirty']}\n")
    return code
