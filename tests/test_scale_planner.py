"""The memory planner: its activation model against what autograd saves, its model-state
accounting under each ZeRO stage, and its peak against real CPU training steps (within 25%)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from llip_scale.config import ConfigError, load_config
from llip_scale.model import build_model
from llip_scale.scale import measure, planning

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "tiny.yaml"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny_run.yaml"
    path.write_text(f"base: {TINY}\ndata: {{context_length: 32}}\nbatch_size: 64\n")
    return path


# -- activations: the per-block model is what autograd actually keeps --------------------------

def _saved_bytes(module, *inputs) -> int:
    """Bytes of the distinct storages autograd saves for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(seen.values())


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_tower_activations_match_autograd(tiny_config, activation):
    cfg = load_config(tiny_config, [f"model.vision.activation={activation}", f"model.text.activation={activation}"])
    m, b = cfg.model, 4
    model = build_model(m)
    v, t = m.vision, m.text
    images = torch.randn(b, 3, v.image_size, v.image_size)
    tokens = torch.randint(3, t.vocab_size, (b, t.context_length))
    vis = planning.tower_activations(v.grid ** 2 + v.num_tokens, v.width, v.depth, v.mlp_dim, v.activation, False)
    txt = planning.tower_activations(t.context_length, t.width, t.depth, t.mlp_dim, t.activation, False)
    # The vision module also saves its input images (the planner's "input batch") and the
    # ln_post input of the K tokens (counted with the head projections).
    vision_extra = 3 * v.image_size ** 2 + v.num_tokens * v.width
    assert _saved_bytes(model.visual, images) == pytest.approx(4 * b * (vis.saved + vision_extra), rel=0.02)
    assert _saved_bytes(model.text, tokens) == pytest.approx(4 * b * txt.saved, rel=0.02)


def test_checkpointing_keeps_only_block_inputs():
    cfg = load_config("experiments/llip_g14.yaml")
    v = cfg.model.vision
    tokens = v.grid ** 2 + v.num_tokens
    full = planning.tower_activations(tokens, v.width, v.depth, v.mlp_dim, v.activation, False)
    ckpt = planning.tower_activations(tokens, v.width, v.depth, v.mlp_dim, v.activation, True)
    assert ckpt.saved == (v.depth + 1) * tokens * v.width
    assert full.saved > 15 * ckpt.saved
    assert ckpt.transient > full.transient  # backward recomputes one whole block


# -- model states under ZeRO ------------------------------------------------------------------

def test_model_states_per_stage(tiny_config):
    cfg = load_config(tiny_config)
    P = sum(p.numel() for p in build_model(cfg.model).parameters())
    fp32 = measure.cpu_plan(cfg, 8)
    assert fp32.params.total == P
    assert fp32.static["parameters"] == 4 * P and fp32.static["optimizer: Adam moments"] == 8 * P
    assert fp32.step["gradients"] == 4 * P
    states = lambda plan: sum(v for part in (plan.static, plan.step) for k, v in part.items()  # noqa: E731
                              if k.startswith(("parameters", "gradients", "optimizer")))
    # bf16: 2 (weights) + 2 (gradients) + 4 (fp32 master) + 4 (fp32 gradients) + 8 (Adam) bytes
    # per parameter; stage 1 shards the last three, stage 2 also the bf16 gradients, stage 3 all.
    for stage, expected in [(0, 20 * P), (1, 4 * P + 16 * P / 8), (2, 2 * P + 18 * P / 8)]:
        c = load_config(tiny_config, [f"distributed.zero_stage={stage}", "distributed.precision=bf16"])
        assert states(planning.plan_memory(c, 8, 8, "chunked")) == pytest.approx(expected), stage
    z3 = load_config(tiny_config, ["distributed.zero_stage=3", "distributed.precision=bf16"])
    plan = planning.plan_memory(z3, 8, 8, "chunked")
    sharded = {k: v for part in (plan.static, plan.step) for k, v in part.items()
               if "shard" in k or k.startswith("optimizer")}
    assert sum(sharded.values()) == pytest.approx(20 * P / 8)
    assert plan.static["parameters (persistent, whole)"] == 2 * plan.params.persistent(100_000)


def test_offload_moves_the_optimizer_to_cpu(tiny_config):
    base = load_config(tiny_config, ["distributed.zero_stage=3", "distributed.precision=bf16"])
    off = load_config(tiny_config, ["distributed.zero_stage=3", "distributed.precision=bf16",
                                    "distributed.offload_optimizer=true", "distributed.offload_params=true"])
    a, b = planning.plan_memory(base, 4, 8, "chunked"), planning.plan_memory(off, 4, 8, "chunked")
    P = a.params.total
    assert sum(b.cpu.values()) == pytest.approx(16 * P / 4 + 2 * P / 4)
    # Resident GPU memory loses the parameter shard, master weights and moments (14 bytes/param).
    assert sum(a.static.values()) - sum(b.static.values()) == pytest.approx(14 * P / 4)
    assert "optimizer: fp32 gradients" not in b.step and b.peak < a.peak


def test_pair_head_memory_by_backend():
    cfg = load_config("experiments/llip_g14.yaml")
    ref = planning.plan_memory(cfg, 256, 64, "reference")
    ref2 = planning.plan_memory(cfg, 256, 128, "reference")
    chunked = planning.plan_memory(cfg, 256, 128, "chunked")
    key = lambda plan: plan.backward[f"pair head ({plan.backend})"]  # noqa: E731
    assert key(ref2) == pytest.approx(4 * key(ref), rel=0.01)  # Bi x Bt: both double
    assert key(chunked) < key(ref2) / 20


def test_g14_on_256_gpus_fits_80gb_only_with_checkpointing():
    cfg = load_config("experiments/llip_g14.yaml")
    plan = planning.plan_memory(cfg, 256)
    assert plan.micro_batch == 128 and plan.peak < 80 * planning.GiB
    off = load_config("experiments/llip_g14.yaml", ["distributed.activation_checkpointing=false"])
    assert planning.plan_memory(off, 256).peak > 80 * planning.GiB
    best = planning.max_micro_batch(cfg, 256, 80 * planning.GiB)
    assert planning.plan_memory(cfg, 256, best).peak <= 80 * planning.GiB
    assert planning.plan_memory(cfg, 256, best + 1).peak > 80 * planning.GiB


def test_bad_inputs_give_one_clear_line(tiny_config, capsys):
    typo = "distributed.deepspeed.zero_optimization.stage3_prefetch_bucket=5"
    with pytest.raises(ConfigError, match="stage3_prefetch_bucket"):
        planning.zero_settings(load_config(tiny_config, [typo]))
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        planning.plan_memory(load_config(tiny_config), 3)
    assert _tool("plan_memory").main([str(tiny_config), "--world-size", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch_size=64" in err
    # Measuring B/16 at its global batch of 32,768 on this CPU is refused before anything runs.
    assert _tool("plan_memory").main(["experiments/llip_b16.yaml", "--measure"]) == 2
    assert "pass a smaller --batch" in capsys.readouterr().err


def test_cli_prints_the_breakdown(tiny_config, capsys):
    assert _tool("plan_memory").main([str(tiny_config), "--world-size", "2", "--gpu-mem", "8",
                                      "distributed.zero_stage=3", "distributed.precision=bf16"]) == 0
    out = capsys.readouterr().out
    for line in ("parameters (shard)", "activations: vision", "pair head (triton)", "peak", "fits in 8 GiB"):
        assert line in out


# -- validation against real steps on the CPU ---------------------------------------------------

NARROW = {"vision": {"width": 64, "heads": 2, "mlp_dim": 256}, "text": {"width": 64, "heads": 2, "mlp_dim": 256},
          "head": {"embed_dim": 64}}  # memory of tiny's activations at a quarter of the FLOPs
CASES = {  # name: (batch, config)
    "activations": (64, {"model": NARROW}),  # activations dominate
    "checkpointing": (128, {"model": NARROW, "distributed": {"activation_checkpointing": True}}),
    "parameters": (4, {"model": {"vision": {"width": 384, "mlp_dim": 1536, "heads": 6}}}),  # params dominate
    "quickgelu-norm-reference": (64, {"model": {**NARROW, "head": {"embed_dim": 64, "use_norm": True},
                                                 "vision": {**NARROW["vision"], "activation": "quick_gelu"},
                                                 "text": {**NARROW["text"], "activation": "quick_gelu"}},
                                       "loss": {"backend": "reference"}}),
}


@pytest.mark.slow
def test_plan_within_25_percent_of_measured_peak(tmp_path, capsys):
    """Real fp32 training steps (forward, backward, AdamW) of tiny configs, one fresh process."""
    paths = []
    for name, (batch, extra) in CASES.items():
        path = tmp_path / f"{name}.yaml"
        body = {"base": str(TINY), "data": {"context_length": 32}, "batch_size": batch, **extra}
        path.write_text(json.dumps(body))  # JSON is YAML
        paths.append(str(path))
    assert _tool("plan_memory").main([*paths, "--measure", "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [Path(r["config"]).stem for r in results] == list(CASES)
    for r in results:
        assert r["measured_bytes"] > 20 * 2 ** 20, r  # a real step, not noise
        assert 0.75 <= r["ratio"] <= 1.25, r


@pytest.mark.parametrize("name, bi, bt, dtype", [("g14", 128, 32768, torch.bfloat16), ("b32", 64, 4096, torch.float32)])
def test_triton_pair_head_is_the_kernels_own_workspace_plan(name, bi, bt, dtype):
    """The planner's triton line = the bytes the kernel's chunk plan allocates (the per-pair
    stats kept from the forward plus the backward's workspace)."""
    from llip_scale.kernels.pairs import workspace_bytes
    from llip_scale.model import model_config
    from llip_scale.scale.planning import pair_head_bytes

    cfg = model_config(name)
    saved, transient = pair_head_bytes(cfg, bi, bt, "triton", dtype.itemsize)
    assert saved == 2 * bi * bt * 4
    k, e, h = cfg.vision.num_tokens, cfg.head.embed_dim, cfg.head.num_heads
    assert saved + transient == workspace_bytes(bi, bt, k, e, h, dtype)
