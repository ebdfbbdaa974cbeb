"""Run under torchrun (any number of ranks) or alone: resume a run folder's newest checkpoint
on this world size, then save again at the same step, without training, into another run folder.

What the second checkpoint holds is what the resume loaded: the test compares it with the first.

usage: [torchrun --nproc_per_node N] tests/_reshard_worker.py CONFIG FROM_RUN_DIR TO_RUN_DIR [OVERRIDES]
"""
from __future__ import annotations

import sys

from llip_scale.config import load_config
from llip_scale.train import checkpoint
from llip_scale.train.distributed import init_distributed, shutdown
from llip_scale.train.engine import initialize
from llip_scale.train.loop import seed_all, setup_logging


def main(config: str, source: str, target: str, *overrides: str) -> None:
    cfg = load_config(config, [*overrides, f"run_dir={target}"])
    env = init_distributed(cfg.distributed.backend)
    setup_logging(env.rank)
    seed_all(cfg.seed)
    engine = initialize(cfg, env)
    seed_all(cfg.seed + 1 + env.rank)
    saved = checkpoint.resume(engine, source, env, cfg)
    assert saved is not None, f"nothing to resume under {source}"
    checkpoint.save(engine, cfg, saved["train"]["step"], {"train": saved["train"], "rng": checkpoint.rng_state()}, env)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
