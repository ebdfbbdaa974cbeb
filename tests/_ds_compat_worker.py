"""One rank: build a tiny engine at a ZeRO stage and check each private DeepSpeed read that
llip_scale.checkpoints.ds_compat makes against what DeepSpeed's public getters say.

usage: tests/_ds_compat_worker.py CONFIG STAGE  (prints "ok" when every check holds)
"""
from __future__ import annotations

import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param

from llip_scale.checkpoints import ds_compat
from llip_scale.config import load_config
from llip_scale.dist.collectives import exit_without_teardown, init_distributed, shutdown
from llip_scale.train.engine import initialize


def check_zero12(engine) -> None:
    named = dict(engine.module.named_parameters())
    layout = ds_compat.zero12_layout(engine)
    held = {name: (first, offset, count) for _, params in layout for name, first, offset, count in params}
    assert set(held) == set(named), "one rank holds a fragment of every parameter"
    for name, p in named.items():
        fragment = ds_compat.hp_fragment(p)
        first, _, count = held[name]
        assert fragment is not None and first == 0 and count == p.numel() == fragment.numel(), name
        assert torch.equal(fragment.view(p.shape), safe_get_full_fp32_param(p)), name
    for numel, params in layout:  # fragments tile the rank's flat partition in order
        spans = sorted((offset, count) for _, _, offset, count in params)
        assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])) and spans[-1][0] + spans[-1][1] <= numel
    scale = named["head.logit_scale"]
    ds_compat.hp_fragment(scale).data.fill_(1.25)  # writes through to the optimizer's master
    assert float(safe_get_full_fp32_param(scale)) == 1.25
    mappings = ds_compat.slice_mappings(engine)
    assert len(mappings) == len(layout) and {n for group in mappings for n in group} == set(named)


def check_zero3(engine) -> None:
    named = dict(engine.module.named_parameters())
    assert all(ds_compat.hp_fragment(p) is None for p in named.values())
    layout = ds_compat.zero3_layout(engine)
    assert {name for group in layout for name, _ in group} == set(named)
    flat = engine.optimizer.fp32_partitioned_groups_flat
    assert [sum(n for _, n in group) for group in layout] == [int(g.numel()) for g in flat]


def main(config: str, stage: str) -> None:
    cfg = load_config(config, [f"distributed.zero_stage={stage}"])
    env = init_distributed(cfg.distributed.backend)
    engine = initialize(cfg, env)
    (check_zero3 if int(stage) == 3 else check_zero12)(engine)
    shutdown()
    print("ok")


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_without_teardown(0)  # saved and shut down: no teardown that could abort the rank
