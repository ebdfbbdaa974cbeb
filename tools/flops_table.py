#!/usr/bin/env python
"""FLOPs per sample, training time and the released runs' GPUs, one Markdown row per experiment config.

    python tools/flops_table.py                          # Llip and SigLIP, B/32 to G/14
    python tools/flops_table.py configs/experiments/llip_b16.yaml

Counts come from :mod:`llip_scale.scale.flops`; parameters from the memory planner.
"""
from __future__ import annotations

import sys

from llip_scale.config import load_config
from llip_scale.config_files import CONFIG_ROOT
from llip_scale.scale.flops import forward_flops, train_flops_per_sample, training_days
from llip_scale.scale.planning import param_stats

# The released runs (facebookresearch/Llip, llip/run_configs/llip.py): GPUs (nodes x 8) and the
# per-GPU batch; every run sees 32 epochs x 400M = 12.8B samples at a global batch of 32,768.
REFERENCE_RUNS = {"b32": (128, 256), "b16": (128, 256), "l14": (128, 256), "h14": (256, 128), "g14": (256, 128)}
REFERENCE_SAMPLES = 12.8e9
A100_BF16_FLOPS = 312e12  # dense bf16 peak of one A100


def size_row(path: str, mfu: float = 0.4) -> dict:
    """FLOPs of one experiment config, with the released run's GPUs for the time estimate."""

    cfg = load_config(path)
    b = cfg.batch_size
    f = forward_flops(cfg.model, b)
    model_flops = train_flops_per_sample(cfg.model, b, activation_checkpointing=False, pair_recompute=False)
    hardware = train_flops_per_sample(cfg.model, b, cfg.distributed.activation_checkpointing,
                                      pair_mode="plain", pair_recompute=True)
    gpus, per_gpu = REFERENCE_RUNS.get(cfg.model.name, (0, 0))
    days = training_days(REFERENCE_SAMPLES, model_flops, gpus, A100_BF16_FLOPS, mfu) if gpus else float("nan")
    return {"config": path, "name": cfg.model.name, "params": param_stats(cfg.model).total, "forward": f,
            "model_flops": model_flops, "hardware_flops": hardware, "batch": b, "gpus": gpus,
            "per_gpu": per_gpu, "days": days, "checkpointing": cfg.distributed.activation_checkpointing}


def format_table(rows: list[dict], mfu: float = 0.4) -> str:
    head = ("| config | params | fwd GFLOPs/sample: vision / text / pairs | train GFLOPs/sample: model (MFU) / "
            "executed | 12.8B samples | released run: GPUs x batch | days at {:.0%} MFU (A100) |")
    lines = [head.format(mfu), "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = r["forward"]
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:,.0f}M | {f.vision / 1e9:,.1f} / {f.text / 1e9:,.1f} / "
            f"{f.pairs / 1e9:,.1f} | {r['model_flops'] / 1e9:,.0f} / {r['hardware_flops'] / 1e9:,.0f}"
            f"{' (ckpt)' if r['checkpointing'] else ''} | {r['model_flops'] * REFERENCE_SAMPLES / 1e21:,.1f} ZFLOPs | "
            f"{r['gpus']} x {r['per_gpu']} | {r['days']:,.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or \
        [str(CONFIG_ROOT / "experiments" / f"{kind}_{s}.yaml") for kind in ("llip", "siglip") for s in REFERENCE_RUNS]
    print(format_table([size_row(p) for p in paths]).replace(str(CONFIG_ROOT) + "/", ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
