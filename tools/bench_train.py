#!/usr/bin/env python
"""Training throughput of a config with the Llip head vs the SigLIP head on the same towers.

    python tools/bench_train.py [CONFIG] [--steps 60] [--repeats 3] [--nproc 2] [--json OUT.json] [overrides ...]

For each head kind, runs ``llip-train`` (torchrun, ``--nproc`` processes) for ``--steps`` steps
in a fresh folder under ``--work`` without checkpoints or evaluation, then reads its
``metrics.jsonl``: steps/s and samples/s over the logged windows after the first (start-up and
warm-up excluded), the data-wait fraction, and the MFU estimate. Runs alternate between the two
heads ``--repeats`` times; the table shows the median run of each (by steps/s). The Llip
overhead is the ratio of the two step times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(config: str, kind: str, steps: int, nproc: int, work: Path, overrides: list[str]) -> dict:
    run_dir = work / kind
    shutil.rmtree(run_dir, ignore_errors=True)
    every = max(1, steps // 6)
    args = [config, f"run_dir={run_dir}", f"steps={steps}", f"model.head.kind={kind}", "checkpoint.every=0",
            "checkpoint.resume=false", "eval.heldout_samples=0", "eval.zeroshot_dir=", "eval.retrieval_dir=",
            f"logging.every={every}", "logging.progress=none", "logging.tensorboard=false", *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "llip_scale.train", *args] if nproc > 1 else [sys.executable, "-m", "llip_scale.train", *args]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_train: the {kind} run failed:\n{done.stderr[-3000:]}")
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [m for m in logs if "perf/steps_per_s" in m][1:]  # the first window holds the warm-up
    mean = lambda key: sum(m[key] for m in windows) / len(windows)  # noqa: E731
    return {"kind": kind, "steps_per_s": mean("perf/steps_per_s"), "samples_per_s": mean("perf/samples_per_s"),
            "data_wait": mean("perf/data_wait"), "mfu": mean("perf/mfu"), "final_loss": logs[-1]["train/loss"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="configs/experiments/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides for both runs")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_train_"))
    runs: dict[str, list[dict]] = {"llip": [], "siglip": []}
    for _ in range(args.repeats):
        for kind in runs:
            runs[kind].append(run_one(args.config, kind, args.steps, args.nproc, work, args.overrides))
    rows = [sorted(r, key=lambda x: x["steps_per_s"])[len(r) // 2] for r in runs.values()]
    print(f"{'head':8s} {'steps/s':>8s} {'samples/s':>10s} {'data wait':>10s} {'MFU':>8s} {'loss':>8s}")
    for r in rows:
        print(f"{r['kind']:8s} {r['steps_per_s']:8.2f} {r['samples_per_s']:10.1f} {100 * r['data_wait']:9.1f}% "
              f"{100 * r['mfu']:7.2f}% {r['final_loss']:8.3f}")
    overhead = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
    print(f"Llip step time = {overhead:.2f} x SigLIP step time")
    if args.json:
        info = {"config": args.config, "overrides": args.overrides, "steps": args.steps, "nproc": args.nproc,
                "cpu_count": os.cpu_count(), "machine": platform.machine(),
                "load_average": os.getloadavg(), "median": rows, "runs": runs,
                "llip_over_siglip_step_time": overhead}
        args.json.write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
