#!/usr/bin/env python
"""Benchmark the pair computation backends: time and peak memory, forward and forward+backward.

Each measurement runs in a fresh subprocess so that its peak memory (the process's maximum RSS
above what the inputs already used) is not polluted by earlier runs. The child runs with
MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB: otherwise glibc's adaptive threshold keeps freed
multi-MB blocks on its heap and RSS measures allocator caching instead of live tensors.

    python tools/profile_pooler.py                 # the full CPU sweep
    python tools/profile_pooler.py --quick         # a sub-minute sweep
    python tools/profile_pooler.py --json out.json --backends chunked reference
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

FULL_SIZES = [(bi, bt) for bi in (64, 256) for bt in (256, 1024, 4096)]
QUICK_SIZES = [(64, 256), (64, 1024)]


@dataclass
class Case:
    backend: str
    bi: int
    bt: int
    k: int = 32
    e: int = 512
    h: int = 8
    backward: bool = True
    dtype: str = "float32"
    repeats: int = 3


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_case(case: Case) -> dict:
    """Inside the child process: build inputs, measure peak extra memory, then time."""
    import torch

    from llip_scale.pairs import pair_loss

    torch.manual_seed(0)
    dtype = getattr(torch, case.dtype)
    grad = case.backward

    def make(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=dtype)).requires_grad_(grad)

    inputs = [make(case.bi, case.k, case.e), make(case.bi, case.k, case.e), make(case.e, case.e, scale=case.e ** -0.5),
              make(case.bt, case.e), make(case.bt, case.e), torch.tensor(2.0, requires_grad=grad),
              torch.tensor(-10.0, requires_grad=grad)]

    def step():
        with torch.set_grad_enabled(grad):
            loss = pair_loss(*inputs, num_heads=case.h, tau=5.0, offset=0, backend=case.backend)
            if grad:
                loss.backward()
        return loss

    base = _max_rss_mb()
    step()  # the first call also measures the peak
    peak = _max_rss_mb() - base
    times: list[float] = []
    while len(times) < case.repeats and sum(times) < 20.0:  # long cases: fewer repeats
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return dict(asdict(case), time_ms=1e3 * times[len(times) // 2], peak_mb=peak, runs=len(times),
                threads=torch.get_num_threads())


def measure(case: Case, timeout: float = 600) -> dict:
    """Run one case in a fresh interpreter and return its result row."""
    cmd = [sys.executable, __file__, "--child", json.dumps(asdict(case))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return dict(asdict(case), error=(proc.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep(backends: list[str], sizes: list[tuple[int, int]], repeats: int) -> list[dict]:
    rows = []
    for bi, bt in sizes:
        for backward in (False, True):
            for backend in backends:
                row = measure(Case(backend, bi, bt, backward=backward, repeats=repeats))
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


HEADER = f"{'backend':10s} {'Bi':>5s} {'Bt':>6s} {'K':>3s} {'E':>4s} {'H':>2s} {'pass':>8s} {'time ms':>10s} {'peak MB':>9s}"


def format_row(r: dict) -> str:
    kind = "fwd+bwd" if r["backward"] else "fwd"
    if "error" in r:
        return f"{r['backend']:10s} {r['bi']:5d} {r['bt']:6d} {r['k']:3d} {r['e']:4d} {r['h']:2d} {kind:>8s}  error: {r['error']}"
    return (f"{r['backend']:10s} {r['bi']:5d} {r['bt']:6d} {r['k']:3d} {r['e']:4d} {r['h']:2d} {kind:>8s} "
            f"{r['time_ms']:10.1f} {r['peak_mb']:9.1f}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: under a minute")
    p.add_argument("--backends", nargs="+", default=["reference", "chunked"])
    p.add_argument("--json", default=None, help="write the rows as JSON to this path")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(Case(**json.loads(args.child)))))
        return 0
    sizes, repeats = (QUICK_SIZES, 1) if args.quick else (FULL_SIZES, 3)
    print(HEADER)
    rows = sweep(args.backends, sizes, repeats)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
