"""One rank of the ZeRO-3 checks in test_scale_zero3.py (launched by torchrun on the CPU).

    torchrun --nproc_per_node 2 tests/zero3_worker.py OUT_DIR exact [memory SIZE [VISION_DEPTH]]

``exact``: build the tiny model under zero.Init in fp32 and compare every gathered parameter
with a plain build from the same seed (Llip with CLIP-init blocks, and SigLIP with
``vision.block_init: torch``). ``memory``: build a named size in bf16 (optionally with
fewer blocks) and report the local shard sizes and the resident high-water mark. Each rank
writes OUT_DIR/rank{R}.json with one entry per check.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch

from llip_scale.model import build_model, model_config
from llip_scale.scale import measure
from llip_scale.train.zero_init import build_model_zero3

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
             "bf16": {"enabled": True}}


def exact(rank: int, kind: str, block_init: str) -> dict:
    cfg = model_config("tiny", kind=kind)
    cfg.vision.block_init = block_init
    torch.manual_seed(0)
    model = build_model_zero3(cfg, torch.float32, DS_CONFIG)
    params = dict(model.named_parameters())
    local = sum(p.ds_tensor.numel() for p in params.values())
    mismatched = []
    with deepspeed.zero.GatheredParameters(list(params.values())):
        if rank == 0:
            torch.manual_seed(0)
            plain = dict(build_model(cfg).named_parameters())
            mismatched = [n for n, p in params.items() if not torch.equal(p.detach().cpu(), plain[n].detach())]
            stds = {"text.token_embedding.weight": params["text.token_embedding.weight"].std().item()}
    out = {"local": local, "total": sum(p.ds_numel for p in params.values()), "mismatched": mismatched}
    return {**out, **({"stds": stds} if rank == 0 else {})}


def memory(rank: int, args: list[str]) -> dict:
    cfg = model_config(args[0])
    if len(args) > 1:  # fewer blocks, same widths
        cfg.vision.depth, cfg.text.depth = int(args[1]), max(1, int(args[1]) * cfg.text.depth // cfg.vision.depth)
    baseline = measure.reset_peak()
    model = build_model_zero3(cfg, torch.bfloat16, DS_CONFIG)
    params = list(model.parameters())
    return {"local": sum(p.ds_tensor.numel() for p in params), "total": sum(p.ds_numel for p in params),
            "dtypes": sorted({str(p.ds_tensor.dtype) for p in params}),
            "peak_bytes": measure.peak_bytes() - baseline, "rss_bytes": measure.status_bytes("VmRSS") - baseline,
            "vision_depth": cfg.vision.depth}


def main() -> None:
    out_dir, checks = Path(sys.argv[1]), sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    results = {}
    if "exact" in checks:
        results["exact"] = exact(rank, "llip", "clip")
        # The pooled head's projection and the PyTorch-default blocks (Xavier q/k/v) as well.
        results["exact_siglip_torch_init"] = exact(rank, "siglip", "torch")
    if "memory" in checks:
        results["memory"] = memory(rank, checks[checks.index("memory") + 1:])
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
