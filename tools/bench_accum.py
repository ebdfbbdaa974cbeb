#!/usr/bin/env python
"""Peak memory and throughput of gradient accumulation at a fixed global batch (CPU, one process).

    python tools/bench_accum.py [CONFIG] [--batch 128] [--accum 1 2 4 8] [--steps 3] [--repeats 1]
                                [--json OUT] [overrides ...]

For each ``accum``, a fresh process builds the model of CONFIG (default: the tiny model) in fp32
with AdamW, runs one warm-up step, resets the resident high-water mark
(:mod:`llip_scale.scale.measure`), then runs ``--steps`` steps of the same global batch encoded
in ``accum`` micro-batches (:mod:`llip_scale.train.step`). Reported per ``accum``: the peak
resident memory above the baseline, samples/s, and the size of the feature cache (the features
of the batch and their gradients, what accumulation keeps besides one micro-batch). glibc's mmap
threshold is pinned so that freed tensors leave the resident set. With ``--repeats R`` the
values of ``accum`` take turns R times and the table shows the median run of each (by samples/s);
peak memory does not depend on the machine's load, samples/s does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(REPO / "configs" / "models" / "tiny.yaml")


def measure(config: str, overrides: list[str], batch: int, accum: int, steps: int) -> dict:
    """One process: warm-up, then ``steps`` timed steps; the numbers of this ``accum``."""
    import gc

    import torch

    from llip_scale.config import load_config
    from llip_scale.model import build_model
    from llip_scale.scale.measure import peak_bytes, reset_peak
    from llip_scale.train.step import backward, forward_step

    cfg = load_config(config, [f"batch_size={batch}", f"micro_batch_size={batch // accum}", *overrides])
    m = cfg.model
    torch.manual_seed(cfg.seed)
    model = build_model(m, cfg.loss.backend, cfg.loss.chunk_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, m.vision.image_size, m.vision.image_size)
    tokens = torch.randint(3, m.text.vocab_size, (batch, m.text.context_length))
    tokens[:, m.text.context_length // 2] = m.text.eot_id

    def one_step() -> float:
        step = forward_step(model, images, tokens, accum)
        backward(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(step.loss.detach())

    one_step()  # warm-up: one-time allocations, AdamW's state
    gc.collect()
    baseline = reset_peak()
    started = time.perf_counter()
    losses = [one_step() for _ in range(steps)]
    seconds = time.perf_counter() - started
    per_sample = 2 * m.head.embed_dim * (m.vision.num_outputs + 1 if m.head.kind == "llip" else 1)
    cache = 2 * 4 * per_sample * batch * (accum - 1) // accum  # features + gradients, fp32
    return {"accum": accum, "micro_batch": batch // accum, "peak_mib": (peak_bytes() - baseline) / 2 ** 20,
            "samples_per_s": steps * batch / seconds, "cache_mib": cache / 2 ** 20, "loss": losses[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="YAML config (default: the tiny model)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.head.kind=siglip")
    p.add_argument("--batch", type=int, default=128, help="the global batch, fixed for every accum")
    p.add_argument("--accum", type=int, nargs="+", default=[1, 2, 4, 8], help="micro-batches per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per accum")
    p.add_argument("--repeats", type=int, default=1, help="runs per accum, taking turns; the median is shown")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.config, args.overrides, args.batch, args.worker, args.steps)))
        return 0
    bad = [a for a in args.accum if a < 1 or args.batch % a]
    if bad:
        p.error(f"--accum {bad[0]} does not divide --batch {args.batch}")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    runs: dict[int, list[dict]] = {accum: [] for accum in args.accum}
    for _ in range(args.repeats):
        for accum in args.accum:
            cmd = [sys.executable, __file__, args.config, *args.overrides, "--batch", str(args.batch),
                   "--steps", str(args.steps), "--worker", str(accum)]
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"bench_accum: accum={accum} failed:\n{done.stderr[-3000:]}")
            runs[accum].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [sorted(r, key=lambda x: x["samples_per_s"])[len(r) // 2] for r in runs.values()]
    print(f"{'accum':>5s} {'micro':>6s} {'peak MiB':>9s} {'cache MiB':>10s} {'samples/s':>10s} {'loss':>8s}")
    for r in rows:
        print(f"{r['accum']:5d} {r['micro_batch']:6d} {r['peak_mib']:9.1f} {r['cache_mib']:10.2f} "
              f"{r['samples_per_s']:10.1f} {r['loss']:8.4f}")
    if args.json:
        info = {"config": args.config, "overrides": args.overrides, "batch": args.batch, "steps": args.steps,
                "cpu_count": os.cpu_count(), "machine": platform.machine(), "load_average": os.getloadavg(),
                "torch_threads": env["OMP_NUM_THREADS"], "repeats": args.repeats, "median": rows,
                "runs": {str(a): r for a, r in runs.items()}}
        args.json.write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
