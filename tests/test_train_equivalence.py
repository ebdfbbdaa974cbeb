"""Two ranks equal one process: loss and every gradient, ZeRO stage 0 and 3 (fp32, CPU, gloo).

One torchrun launch of ``_equivalence_worker.py`` does the distributed side and the
single-process reference (see its docstring); this module asserts on what it saved. The same
launch checks the logit-scale clamp, that ZeRO-3 starts from the same weights as the plain
model, and leaves a ZeRO-3 checkpoint for the export and ``load_pretrained`` tests.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _train_helpers import PYTHON, REPO, run, tail, write_config

pytestmark = pytest.mark.slow
STAGES = (0, 3, "3+recompute")  # the last with activation checkpointing in both towers


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("equivalence")
    # The logit scale starts above its maximum, so the first step's clamp has work to do.
    config = write_config(tmp / "config.yaml", model={
        "vision": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64,
                   "num_tokens": 4},
        "text": {"vocab_size": 128, "context_length": 16, "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64},
        "head": {"embed_dim": 32, "num_heads": 2, "init_logit_scale": 2.6, "max_logit_scale": 2.5}})
    out = run([PYTHON, "-m", "torch.distributed.run",
               "--nproc_per_node", "2", "--standalone", str(REPO / "tests" / "_equivalence_worker.py"),
               str(config), str(tmp)])
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    return torch.load(tmp / "results.pt", weights_only=False)


@pytest.mark.parametrize("stage", STAGES)
def test_loss_matches_one_process(results, stage):
    r = results[stage]
    assert len(r["losses"]) == 2 and r["losses"][0] != r["losses"][1]  # the ranks saw different images
    assert sum(r["losses"]) / 2 == pytest.approx(r["ref_loss"], rel=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_every_gradient_matches_one_process(results, stage):
    r = results[stage]
    assert set(r["grads"]) == set(r["ref_grads"])
    for name, ref in r["ref_grads"].items():
        assert ref.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(r["grads"][name], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()),
                                   msg=lambda m: f"{name}: {m}")


def test_zero3_starts_from_the_same_weights_as_the_plain_model(results):
    plain, zero3 = results[0]["init"], results[3]["init"]
    assert plain.keys() == zero3.keys()
    for name in plain:
        assert torch.equal(plain[name], zero3[name]), name
    # The towers' own init ran (ZeRO-3 partitioning must not skip it): zero biases, small embeddings.
    assert torch.count_nonzero(zero3["visual.transformer.resblocks.0.attn.in_proj.bias"]) == 0
    assert zero3["text.token_embedding.weight"].std() < 0.05


@pytest.mark.parametrize("stage", (0, 3))
def test_logit_scale_is_clamped_in_the_optimizer_copy_too(results, stage):
    r = results[stage]
    top = r["max_logit_scale"]
    for step in (1, 2):
        scale, _ = r[f"clamped_step{step}"]
        assert scale == pytest.approx(top, abs=1e-6), f"after step {step}"
        # The master copy is what the next step starts from: if it kept the unclamped value,
        # the module parameter would be back above the maximum after one more step.
        assert r[f"master_step{step}"] <= top + 1e-6, f"master after step {step}"


def test_export_consolidates_the_zero3_checkpoint_exactly(results, tmp_path):
    from llip_scale.checkpoints.store import export

    weights = export(results[3]["checkpoint"], tmp_path / "export")
    from safetensors.torch import load_file
    exported = load_file(str(weights))
    expected = results[3]["weights_after"]
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(exported[name], value), name


def test_export_tool_and_load_pretrained(results, tmp_path):
    import llip_scale

    run_dir = Path(results[3]["checkpoint"]).parents[1]  # the tool picks its newest checkpoint
    out = run([PYTHON, str(REPO / "tools" / "export_checkpoint.py"), str(run_dir), str(tmp_path / "model")])
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    assert f"exported {results[3]['checkpoint']}" in out.stdout
    model = llip_scale.load_pretrained(tmp_path / "model")
    assert not model.training
    for name, value in results[3]["weights_after"].items():
        assert torch.equal(model.state_dict()[name], value), name
    cfg = model.cfg
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(3, cfg.text.vocab_size, (2, cfg.text.context_length))
    with torch.no_grad():
        keys, values = model.encode_image(images)
        scores = model.score((keys, values), model.encode_text(tokens))
    assert keys.shape == values.shape == (3, cfg.vision.num_tokens, cfg.head.embed_dim)
    assert scores.shape == (3, 2) and torch.isfinite(scores).all()
    assert math.isclose(float(model.head.logit_scale.detach()), results[3]["clamped_step2"][0], rel_tol=1e-6)


def test_load_pretrained_names_a_missing_file(tmp_path):
    import llip_scale

    with pytest.raises(FileNotFoundError, match="export_checkpoint.py"):
        llip_scale.load_pretrained(tmp_path)
