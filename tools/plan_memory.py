#!/usr/bin/env python
"""Per-GPU memory plan of a training config, and the largest per-GPU batch that fits.

    tools/plan_memory.py configs/experiments/llip_g14.yaml --world-size 256 --gpu-mem 80
    tools/plan_memory.py configs/experiments/llip_*.yaml --world-size 256      # one line each
    tools/plan_memory.py CONFIG... --measure [--batch 64] [key.path=value ...]  # check on the CPU
    tools/plan_memory.py g14 --world-size 256     # a size's name plans its Llip recipe

CONFIG takes what tools/model_summary.py takes: a config file, or a size's name (``b16``), which
plans that size's Llip recipe, configs/experiments/llip_NAME.yaml (the size's own
configs/models/NAME.yaml where there is none, as for ``tiny``).

One config prints the full breakdown (parameters, gradients, optimizer states under the ZeRO
stage, gathered parameters, communication buffers, activations with or without checkpointing,
the pair head of the chosen backend). Several configs print one summary line each.
``--measure`` runs real fp32 training steps of each config (at its ``batch_size`` unless
``--batch``) on this machine's CPU in a fresh process and compares the peak resident memory
with the plan of that same run (one process, no ZeRO, fp32, PyTorch AdamW).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from llip_scale.config import load_config
from llip_scale.config_files import CONFIG_ROOT
from llip_scale.errors import ConfigError
from llip_scale.model.zoo import recipe_path, size_or_config
from llip_scale.scale import planning
from llip_scale.scale.measure import cpu_plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="plan_memory.py", description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", metavar="CONFIG",
                   help="YAML config(s) or model size names (b16, g14, ...), then optional dotted "
                        "overrides (key.path=value)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (GPUs)")
    p.add_argument("--batch", type=int, default=None,
                   help="per-GPU batch (default: batch_size / world size; with --measure: batch_size)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GPU memory in GiB for the fit (default 80)")
    p.add_argument("--reserve", type=float, default=planning.DEFAULT_GPU_RESERVE / planning.GiB,
                   help="GiB held by the CUDA context, NCCL and the allocator (default 2)")
    p.add_argument("--backend", choices=["reference", "chunked", "triton"], default=None,
                   help="pair backend (default: the config's; auto plans triton)")
    p.add_argument("--measure", action="store_true", help="run real CPU steps and compare with the plan")
    p.add_argument("--steps", type=int, default=2, help="training steps for --measure")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_intermixed_args(argv)
    args.overrides = [c for c in args.configs if "=" in c]
    args.configs = [c for c in args.configs if "=" not in c]
    if not args.configs:
        p.error("give at least one CONFIG")
    return args


def config_path(arg: str) -> str:
    """A CONFIG argument as a path load_config reads: a config file as given, a size's name as
    its recipe (a name under the packaged configs/)."""
    name, _ = size_or_config(arg)
    return arg if name is None else recipe_path(name).relative_to(CONFIG_ROOT).as_posix()


def _budget(args: argparse.Namespace) -> float:
    return args.gpu_mem * planning.GiB


def plan_one(path: str, args: argparse.Namespace) -> dict:
    cfg = load_config(path, args.overrides)
    reserve = args.reserve * planning.GiB
    plan = planning.plan_memory(cfg, args.world_size, args.batch, args.backend, reserve)
    best = planning.max_micro_batch(cfg, args.world_size, _budget(args), args.backend, reserve)
    return {"config": path, "plan": plan, "max_batch": best}


def summary_line(r: dict, budget: float) -> str:
    p = r["plan"]
    fit = "fits" if p.peak <= budget else "over"
    return (f"{Path(r['config']).stem:<14}{p.params.total / 1e6:>9,.0f}M  ZeRO-{p.zero.stage} "
            f"{p.zero.precision:<5}ckpt {'on ' if p.checkpointing else 'off'} batch/GPU {p.micro_batch:>5}  "
            f"peak {p.peak / planning.GiB:7.1f} GiB ({fit})  max batch/GPU {r['max_batch']:>5}")


_MEASURE = """
import gc, json, sys
from llip_scale.scale import measure, planning
from llip_scale.config import load_config
job = json.loads(sys.argv[1])
for i, path in enumerate(job["configs"]):
    cfg = load_config(path, job["overrides"])
    r = measure.measure_step_memory(cfg, job["batch"] or cfg.batch_size, job["steps"], job["backend"], warmup=i == 0)
    print(json.dumps(r), flush=True)
    gc.collect()
"""


def measure(paths: list[str], args: argparse.Namespace) -> list[dict]:
    """Real steps of each config, one after the other, in one fresh process (the high-water
    mark is reset before each). glibc's mmap threshold is pinned so that freed tensors go back
    to the OS and the peak resident memory is the peak of live memory."""
    job = {"configs": paths, "overrides": args.overrides, "batch": args.batch, "steps": args.steps,
           "backend": args.backend}
    configs = [load_config(p, args.overrides) for p in paths]  # fail on bad configs before running
    for path, cfg in zip(paths, configs):
        need = cpu_plan(cfg, args.batch or cfg.batch_size, args.backend).peak
        if need > 0.8 * _available_bytes():
            raise ConfigError(f"{path}: the CPU run would need ~{need / planning.GiB:.1f} GiB, more than this "
                              f"machine has free ({_available_bytes() / planning.GiB:.1f} GiB); pass a smaller --batch")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(job)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the measuring process failed:\n{out.stderr.strip()}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    results = []
    for path, cfg, line in zip(paths, configs, lines):
        measured = json.loads(line)
        plan = cpu_plan(cfg, measured["micro_batch"], args.backend)
        results.append({"config": path, "batch": measured["micro_batch"], "measured_bytes": measured["peak_bytes"],
                        "planned_bytes": plan.peak, "ratio": plan.peak / measured["peak_bytes"], "plan": plan})
    return results


def _available_bytes() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.configs = [config_path(c) for c in args.configs]
        if args.measure:
            results = measure(args.configs, args)
            for r in results:
                if args.json:
                    print(json.dumps({k: v for k, v in r.items() if k != "plan"}))
                else:
                    print(planning.format_plan(r["plan"], f"{r['config']} (CPU run: one process, fp32)"))
                    print(f"  measured peak {r['measured_bytes'] / planning.GiB:.3f} GiB, planned "
                          f"{r['planned_bytes'] / planning.GiB:.3f} GiB (plan / measured = {r['ratio']:.2f})")
            return 0
        results = [plan_one(c, args) for c in args.configs]
    except ConfigError as e:
        print(f"plan_memory.py: config error: {e}", file=sys.stderr)
        return 2
    for r in results:
        if args.json:
            print(json.dumps({"config": r["config"], "max_batch": r["max_batch"],
                              **planning.plan_as_dict(r["plan"])}))
        elif len(results) == 1:
            print(planning.format_plan(r["plan"], f"{r['config']} on {args.world_size} x "
                                       f"{args.gpu_mem:g} GiB GPUs", _budget(args), r["max_batch"]))
        else:
            print(summary_line(r, _budget(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
