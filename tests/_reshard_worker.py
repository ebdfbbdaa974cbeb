"""Run under torchrun (any number of ranks) or alone: resume a run folder's newest checkpoint
on this world size, then save again at the same step, without training, into another run folder.

What the second checkpoint holds is what the resume loaded: the test compares it with the first.
Before saving, rank 0 also writes TO_RUN_DIR/probe.pt: the engine's state as DeepSpeed's public
getters see it (module weights gathered, the fp32 master and both moments of every parameter),
its learning rate and step counter, and the layout the reshard read from the engine.

usage: [torchrun --nproc_per_node N] tests/_reshard_worker.py CONFIG FROM_RUN_DIR TO_RUN_DIR [OVERRIDES]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from llip_scale.checkpoints import ds_compat
from llip_scale.checkpoints import store as checkpoint
from llip_scale.config import load_config
from llip_scale.dist.collectives import exit_without_teardown, init_distributed, shutdown
from llip_scale.train.engine import full_state_dict, initialize
from llip_scale.train.loop import seed_all, setup_logging


def probe(engine, stage: int) -> dict:
    """The engine's state through DeepSpeed's public getters (collectives: every rank calls)."""
    out = {"module": full_state_dict(engine), "lr": engine.get_lr(), "global_steps": engine.global_steps}
    if stage in (1, 2):  # DeepSpeed links the moments to the getters at the first step only
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    if stage > 0:
        for key in ("fp32", *ds_compat.MOMENTS):
            get = safe_get_full_fp32_param if key == "fp32" else lambda p, k=key: safe_get_full_optimizer_state(p, k)
            out[key] = {n: get(p).detach().clone() for n, p in engine.module.named_parameters()}
        out["layout"] = ds_compat.zero3_layout(engine) if stage == 3 else ds_compat.zero12_layout(engine)
    return out


def main(config: str, source: str, target: str, *overrides: str) -> None:
    cfg = load_config(config, [*overrides, f"run_dir={target}"])
    env = init_distributed(cfg.distributed.backend)
    setup_logging(env.rank)
    seed_all(cfg.seed)
    engine = initialize(cfg, env)
    seed_all(cfg.seed + 1 + env.rank)
    saved = checkpoint.resume(engine, source, env, cfg)
    assert saved is not None, f"nothing to resume under {source}"
    seen = probe(engine, cfg.distributed.zero_stage)
    if env.is_main:
        Path(target).mkdir(parents=True, exist_ok=True)
        torch.save(seen, Path(target) / "probe.pt")
    checkpoint.save(engine, cfg, saved["train"]["step"], {"train": saved["train"], "rng": checkpoint.rng_state()}, env)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_without_teardown(0)  # saved and shut down: no teardown that could abort the rank
