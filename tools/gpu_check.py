#!/usr/bin/env python
"""The Python steps of tools/gpu_check.sh: preflight, and the verdict over what the steps left.

    python tools/gpu_check.py imports              # the modules the GPU check needs import (no GPU needed)
    python tools/gpu_check.py preflight            # ... and a CUDA device is visible: one line either way
    python tools/gpu_check.py verdict OUT_DIR --step tests:0:95:170 --step profile:0:140:200

Every failure is one line starting with ``FAIL:`` and a non-zero exit. ``verdict`` reads the
pytest junit XML files (OUT_DIR/tests*.xml) and the profile (OUT_DIR/profile.json), writes every figure
into OUT_DIR/results.md and passes only if every step finished within its limit with exit code 0,
at least one kernel test ran, no test failed, errored or was skipped, and every profile row was
measured (the triton rows with bitwise repeatable gradients).

Needs only the standard library, torch and the package (no deepspeed, webdataset or submitit).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the GPU check imports: the kernel tests (tests/test_kernel_gpu.py, tests/test_kernel_pairs.py
# and tests/conftest.py) and tools/profile_pooler.py, beyond torch and pytest.
MODULES = ("triton", "triton.testing", "llip_scale.kernels.pairs", "llip_scale.kernels.pair_kernels",
           "llip_scale.pairs", "llip_scale.model", "llip_scale.scale.flops")
TIMEOUT_RCS = (124, 137)  # timeout(1): limit reached; killed after the grace period


def check_imports(modules=MODULES) -> Optional[str]:
    """None when every module imports from this checkout, else the one-line reason."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # ImportError, or anything a module raises while importing
            return f"{name} does not import: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        path = getattr(module, "__file__", None) or ""
        if name.startswith("llip_scale") and not os.path.realpath(path).startswith(os.path.realpath(ROOT) + os.sep):
            return f"{name} imports from {path}, not from this checkout ({ROOT})"
    return None


def versions() -> str:
    import platform

    import torch
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton missing")
    return ", ".join(parts)


def preflight(need_cuda: bool = True) -> int:
    try:
        import torch
    except ImportError as err:
        print(f"FAIL: torch does not import: {err}")
        return 1
    if need_cuda and not torch.cuda.is_available():
        print(f"FAIL: no CUDA device visible to {sys.executable} ({versions()})")
        return 1
    reason = check_imports()
    if reason:
        print(f"FAIL: {reason}")
        return 1
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    cap = "".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else "-"
    print(f"device: {device} (sm_{cap}) | {versions()}")
    return 0


# -- verdict ------------------------------------------------------------------------------------
def junit_summary(*paths: str) -> dict:
    """Counts and per-test outcomes of pytest junit XML files, together."""
    suites = []
    for path in paths:
        root = ET.parse(path).getroot()
        suites += [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = dict(tests=0, failures=0, errors=0, skipped=0, cases=[])
    for suite in suites:
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = tag
                    message = (node.get("message") or node.text or "").strip().splitlines()
                    message = message[0][:200] if message else ""
                    break
            out["tests"] += 1
            if outcome != "passed":
                out[{"failure": "failures", "error": "errors", "skipped": "skipped"}[outcome]] += 1
            out["cases"].append(dict(name=name, outcome=outcome, message=message,
                                     time=float(case.get("time") or 0.0)))
    return out


def junit_problems(summary: Optional[dict]) -> list[str]:
    """Why the kernel tests do not count as passed (empty: they do). A skip is a problem: on the
    GPU machine every kernel test must run."""
    if summary is None:
        return ["no junit XML from the kernel tests (pytest did not run or did not finish)"]
    problems = []
    if summary["tests"] == 0:
        problems.append("no kernel test ran")
    for key in ("failures", "errors", "skipped"):
        if summary[key]:
            first = next(c for c in summary["cases"] if c["outcome"] == _outcome_key(key))
            verb = {"failures": "failed", "errors": "errored", "skipped": "skipped"}[key]
            problems.append(f"{summary[key]} kernel test(s) {verb}: first {first['name']}: {first['message'][:160]}")
    return problems


def _outcome_key(key: str) -> str:
    return {"failures": "failure", "errors": "error", "skipped": "skipped"}[key]


def profile_problems(doc: Optional[dict], expected: int = 0) -> list[str]:
    if doc is None:
        return ["no profile.json (the profile did not run or did not write)"]
    rows = doc.get("rows", [])
    problems = []
    if len(rows) < expected:
        problems.append(f"profile has {len(rows)} of {expected} rows")
    for r in rows:
        label = f"{r.get('backend')} {r.get('bi')}x{r.get('bt')} {'fwd+bwd' if r.get('backward') else 'fwd'}"
        if "error" in r:
            problems.append(f"profile {label}: {r['error']}")
        elif r.get("backend") == "triton" and r.get("repeatable") is False:
            problems.append(f"profile {label}: gradients differ between two runs")
    return problems


def parse_step(text: str) -> dict:
    name, rc, seconds, limit = text.split(":")
    return dict(name=name, rc=int(rc), seconds=int(seconds), limit=int(limit))


def step_problems(steps: list[dict]) -> tuple[list[str], list[str]]:
    """(steps that ran past their limit, steps that exited with an error)."""
    late = [f"step {s['name']} ran past its limit of {s['limit']} s" for s in steps if s["rc"] in TIMEOUT_RCS]
    failed = [f"step {s['name']} exited with {s['rc']}" for s in steps if s["rc"] not in (0, *TIMEOUT_RCS)]
    return late, failed


def _load_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _profile_markdown(doc: dict) -> str:
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from profile_pooler import markdown
    return markdown(doc.get("rows", []), doc)


def verdict(out_dir: str, steps: list[dict], expected_rows: int = 0, header: str = "") -> int:
    junits = sorted(glob.glob(os.path.join(out_dir, "tests*.xml")))
    summary = junit_summary(*junits) if junits else None
    profile = _load_json(os.path.join(out_dir, "profile.json"))
    late, failed = step_problems(steps)
    # The most telling reason first: a step cut off, then what the tests and the profile say.
    problems = late + junit_problems(summary) + profile_problems(profile, expected_rows) + failed
    line = ("PASS: " + (f"{summary['tests']} kernel tests passed, " if summary else "")
            + f"{len(profile['rows']) if profile else 0} profile rows measured") if not problems \
        else f"FAIL: {problems[0]}" + (f" (+{len(problems) - 1} more, see results.md)" if len(problems) > 1 else "")
    lines = ["# GPU check of the Triton pair kernels", "", f"**{line}**", ""]
    if header:
        lines += [header.strip(), ""]
    lines += ["## Steps", "", "| step | exit code | seconds | limit s |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['rc']} | {s['seconds']} | {s['limit']} |" for s in steps]
    if problems:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    lines += ["", "## Kernel tests", ""]
    if summary:
        lines.append(f"{summary['tests']} tests: {summary['failures']} failed, {summary['errors']} errors, "
                     f"{summary['skipped']} skipped; slowest first:")
        lines += ["", "| test | outcome | s | message |", "|---|---|---|---|"]
        for c in sorted(summary["cases"], key=lambda c: -c["time"]):
            lines.append(f"| {c['name']} | {c['outcome']} | {c['time']:.1f} | {c['message'].replace('|', '/')} |")
    else:
        lines.append("no results")
    lines += ["", "## Profile (tools/profile_pooler.py)", ""]
    lines.append(_profile_markdown(profile) if profile else "no results")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(line)
    return 0 if not problems else 1


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("imports", help="the modules the GPU check needs import from this checkout")
    sub.add_parser("preflight", help="imports, and a CUDA device is visible")
    v = sub.add_parser("verdict", help="write OUT_DIR/results.md and print PASS or FAIL")
    v.add_argument("out_dir")
    v.add_argument("--step", action="append", default=[], type=parse_step, help="NAME:RC:SECONDS:LIMIT")
    v.add_argument("--expected-rows", type=int, default=0)
    v.add_argument("--header", default="", help="markdown placed under the verdict (device, commit)")
    args = p.parse_args(argv)
    if args.cmd == "imports":
        return preflight(need_cuda=False)
    if args.cmd == "preflight":
        return preflight(need_cuda=True)
    return verdict(args.out_dir, args.step, args.expected_rows, args.header)


if __name__ == "__main__":
    sys.exit(main())
