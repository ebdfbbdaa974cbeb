"""FLOP accounting checked against PyTorch's own FLOP counter on real forward/backward passes."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llip_scale.model import build_model, model_config
from llip_scale.scale import flops

BATCH = 6
ROOT = Path(__file__).resolve().parents[1]


def _flops_table():
    spec = importlib.util.spec_from_file_location("flops_table", ROOT / "tools" / "flops_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(cfg):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tokens = torch.randint(3, cfg.text.vocab_size, (BATCH, cfg.text.context_length), generator=g)
    tokens[:, 10] = cfg.text.eot_id
    return images, tokens


def _counted(model, images, tokens) -> tuple[float, float]:
    """(forward, backward) FLOPs per sample; the math attention path so attention is counted."""
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            loss = model(images, tokens)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    return fwd.get_total_flops() / BATCH, bwd.get_total_flops() / BATCH


@pytest.mark.parametrize("kind,backend,mode", [
    ("llip", "reference", "plain"),  # materialises z = mixed @ W_o: the plain definition
    ("llip", "chunked", "gram"),  # the Gram-matrix reformulation, recomputed in backward
    ("siglip", "reference", "plain"),
    ("clip", "reference", "plain"),
])
def test_counts_match_the_flop_counter(kind, backend, mode):
    torch.manual_seed(0)
    cfg = model_config("tiny", kind=kind)
    fwd, bwd = _counted(build_model(cfg, backend=backend), *_batch(cfg))
    expected = flops.forward_flops(cfg, BATCH, mode)
    # Forward: every matmul is counted; only the final cos dot product of `reference` is extra.
    assert fwd == pytest.approx(expected.total, rel=1e-3)
    recompute = backend == "chunked"
    train = flops.train_flops_per_sample(cfg, BATCH, pair_mode=mode, pair_recompute=recompute)
    # Backward skips the input gradient of the patch embedding (images need no gradient).
    assert fwd + bwd == pytest.approx(train, rel=0.015)
    assert fwd + bwd < train


@pytest.mark.slow
def test_activation_checkpointing_recomputes_the_blocks():
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = build_model(cfg, backend="chunked")
    plain = sum(_counted(model, *_batch(cfg)))
    model.visual.transformer.grad_checkpointing = True
    model.text.transformer.grad_checkpointing = True
    ckpt = sum(_counted(model, *_batch(cfg)))
    expected = flops.train_flops_per_sample(cfg, BATCH, activation_checkpointing=True, pair_mode="gram")
    assert ckpt == pytest.approx(expected, rel=0.015)
    # The extra work is exactly the recomputed blocks: a forward of them minus each block's MLP
    # output projection (the checkpoint stops once backward has what it needs).
    assert ckpt - plain == pytest.approx(2 * flops.recompute_macs(cfg), rel=1e-3)
    v = cfg.vision
    full = flops.transformer_macs(v.grid ** 2 + v.num_tokens, v.width, v.depth, v.mlp_dim)
    assert flops.recompute_macs(cfg) < full + flops.text_macs(cfg)


def test_pair_cost_grows_with_the_global_batch():
    cfg = model_config("b16")
    small, big = flops.forward_flops(cfg, 1024), flops.forward_flops(cfg, 32768)
    assert big.pairs == pytest.approx(32 * small.pairs)
    assert big.vision == small.vision
    k, e = cfg.vision.num_tokens, cfg.head.embed_dim
    assert big.pairs == 2 * 32768 * (2 * k * e + e * e)
    # The reformulations the backends use are cheaper than the plain definition here.
    assert flops.pair_macs(32, 512, 8, "gram") < flops.pair_macs(32, 512, 8, "plain")


def test_mfu_and_days():
    per_sample = 1e12
    assert flops.model_flops_utilization(100.0, per_sample, 4, 1e14) == pytest.approx(0.25)
    days = flops.training_days(86400 * 100.0, per_sample, 4, 1e14, 0.25)
    assert days == pytest.approx(1.0)
    with pytest.raises(ValueError, match="pair mode"):
        flops.pair_macs(8, 64, 4, "dense")


def test_size_table_of_an_experiment():
    table = _flops_table()
    row = table.size_row("experiments/llip_g14.yaml")
    cfg = model_config("g14")
    assert row["params"] == sum(p.numel() for p in _meta_model(cfg).parameters())
    assert row["model_flops"] == flops.train_flops_per_sample(cfg, 32768) - \
        flops.forward_flops(cfg, 32768).pairs  # MFU counts no recomputation
    assert row["hardware_flops"] > row["model_flops"]  # checkpointing and the pair recompute
    assert row["days"] == pytest.approx(flops.training_days(12.8e9, row["model_flops"], 256, 312e12, 0.4))
    assert "| 256 x 128 |" in table.format_table([row])


def test_size_table_runs_as_a_script():
    out = subprocess.run([str(ROOT / "tools" / "flops_table.py"), "experiments/llip_b16.yaml"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    header, rule, row = out.stdout.splitlines()
    assert header.startswith("| config | params |") and row.startswith("| experiments/llip_b16.yaml | ")
    assert "| 128 x 256 |" in row  # the released B/16 run: 16 nodes x 8 GPUs, 256 per GPU


def _meta_model(cfg):
    with torch.device("meta"):
        return build_model(cfg)
