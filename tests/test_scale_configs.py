"""Every experiment config loads, carries the reference recipe, and its DeepSpeed knobs are
valid DeepSpeed ZeRO settings placed where DeepSpeed reads them."""
from __future__ import annotations

from pathlib import Path

import pytest

from llip_scale.config import load_config
from llip_scale.config_files import CONFIG_ROOT

SIZES = {  # size: (lr, K, tau, use_norm)
    "b32": (5e-4, 32, 5.0, False), "b16": (5e-4, 32, 5.0, False), "l14": (4e-4, 32, 1.0, False),
    "h14": (4e-4, 64, 5.0, True), "g14": (4e-4, 64, 5.0, True),
}
# The reference-recipe experiments, KIND_SIZE.yaml (demo.yaml, the CPU demo, is not one).
EXPERIMENTS = sorted(p for p in (CONFIG_ROOT / "experiments").glob("*.yaml")
                     if p.stem.partition("_")[2] in SIZES)


def _zero_config(cfg):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = dict(cfg.distributed.deepspeed.get("zero_optimization", {}))
    return DeepSpeedZeroConfig(stage=cfg.distributed.zero_stage, **zero)


def test_every_size_has_llip_siglip_and_clip():
    names = {p.stem for p in EXPERIMENTS}
    assert names >= {f"{kind}_{size}" for kind in ("llip", "siglip", "clip") for size in SIZES}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_loads_with_the_reference_recipe(path: Path):
    cfg = load_config(path)
    kind, size = path.stem.split("_")
    lr, k, tau, use_norm = SIZES[size]
    assert cfg.model.name == size and cfg.model.head.kind == kind
    assert cfg.batch_size == 32768 and cfg.steps * cfg.batch_size == 12_800_000_000
    o = cfg.optim
    assert (o.lr, tuple(o.betas), o.eps, o.weight_decay) == (lr, (0.9, 0.95), 1e-6, 0.2)
    assert (o.warmup_steps, o.schedule) == (2000, "cosine")
    assert cfg.model.vision.image_size == 224 and cfg.data.context_length == 77
    assert cfg.model.vision.num_tokens == (k if kind == "llip" else 1)
    if kind == "llip":
        assert (cfg.model.head.tau, cfg.model.head.use_norm, cfg.model.head.num_heads) == (tau, use_norm, 8)
    assert cfg.distributed.zero_stage == 3 and cfg.distributed.precision == "bf16"
    # The knobs sit under zero_optimization, with names DeepSpeed accepts (it forbids extras).
    zero = _zero_config(cfg)
    assert zero.prefetch_bucket_size == 50_000_000
    assert zero.max_live_parameters == 300_000_000
    assert zero.param_persistence_threshold == 100_000


def test_baselines_differ_from_llip_only_in_the_head():
    for size in SIZES:
        llip = load_config(f"experiments/llip_{size}.yaml")
        for kind in ("siglip", "clip"):
            other = load_config(f"experiments/{kind}_{size}.yaml")
            assert other.optim == llip.optim and other.distributed == llip.distributed
            assert other.model.text == llip.model.text
            assert other.model.vision.width == llip.model.vision.width


def test_offload_preset_moves_optimizer_and_parameters_to_cpu():
    cfg = load_config("deepspeed/zero3_bf16_offload.yaml")
    assert cfg.distributed.offload_optimizer and cfg.distributed.offload_params
    zero = _zero_config(cfg)
    assert zero.offload_optimizer.device == "cpu" and zero.offload_param.device == "cpu"
    assert zero.max_live_parameters == 300_000_000  # inherited from the ZeRO-3 preset
