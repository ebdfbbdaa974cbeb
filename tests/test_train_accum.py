"""Gradient accumulation with cached features: accum micro-batches equal one batch.

One process, the plain model: the loss and every parameter gradient of a step encoded in 4
micro-batches (llip_scale.train.step) against the same batch in one forward, for every head kind
and pair backend, in float64 and fp32; a random op in both towers shows that the second pass
replays the first one's draws. Also the config errors of impossible micro-batch sizes.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _train_helpers import PYTHON, REPO, run, write_config

from llip_scale.config import ConfigError, batch_split, load_config, local_batch_size
from llip_scale.model import build_model
from llip_scale.train.step import backward, forward_step

SMALL_MODEL = {"vision.image_size": 16, "vision.patch_size": 8, "vision.width": 32, "vision.depth": 1,
               "vision.heads": 2, "vision.mlp_dim": 64, "vision.num_tokens": 4, "text.vocab_size": 128,
               "text.context_length": 16, "text.width": 32, "text.depth": 1, "text.heads": 2, "text.mlp_dim": 64,
               "head.embed_dim": 32, "head.num_heads": 2}
BATCH, ACCUM = 16, 4


def model_config(kind: str):
    overrides = [f"model.{k}={v}" for k, v in SMALL_MODEL.items()] + [f"model.head.kind={kind}"]
    return load_config(str(REPO / "configs" / "models" / "tiny.yaml"), overrides).model


def batch(cfg, dtype: torch.dtype, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g, dtype=dtype)
    tokens = torch.randint(3, cfg.text.vocab_size, (n, cfg.text.context_length), generator=g)
    tokens[torch.arange(n), torch.randint(2, cfg.text.context_length, (n,), generator=g)] = cfg.text.eot_id
    return images, tokens


def two_models(kind: str, backend: str, dtype: torch.dtype):
    cfg = model_config(kind)
    torch.manual_seed(0)
    model = build_model(cfg, backend).to(dtype)
    return cfg, model, copy.deepcopy(model)


def assert_same_step(one, accumulated, one_loss, acc_loss, rtol: float) -> None:
    assert acc_loss.item() == pytest.approx(one_loss.item(), rel=rtol)
    for (name, p), q in zip(one.named_parameters(), accumulated.parameters()):
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name} got no gradient"
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


CASES = [("llip", "reference"), ("llip", "chunked"), ("siglip", "chunked"), ("clip", "chunked")]


@pytest.mark.parametrize("kind,backend", CASES)
def test_accumulation_equals_one_batch_in_float64(kind, backend):
    cfg, one, acc = two_models(kind, backend, torch.float64)
    images, tokens = batch(cfg, torch.float64)
    loss = one(images, tokens)
    loss.backward()
    step = forward_step(acc, images, tokens, ACCUM)
    assert len(step.more) == ACCUM - 1
    backward(step)
    assert_same_step(one, acc, loss, step.loss, rtol=1e-10)


@pytest.mark.parametrize("kind,backend", CASES + [("llip", "triton")])
def test_accumulation_equals_one_batch_in_fp32(kind, backend):
    if backend == "triton":
        pytest.importorskip("llip_scale.kernels.pairs", reason="needs triton")
    cfg, one, acc = two_models(kind, backend, torch.float32)
    images, tokens = batch(cfg, torch.float32, n=8 if backend == "triton" else BATCH)
    loss = one(images, tokens)
    loss.backward()
    backward(step := forward_step(acc, images, tokens, ACCUM))
    assert_same_step(one, acc, loss, step.loss, rtol=1e-5)


def test_accumulation_with_an_offset_matches_the_global_positives():
    """A rank's images sit at columns offset.. of the gathered texts: with an identity
    'gather' of 2 x the texts, the accumulated loss is the same as the one-batch loss."""
    cfg, one, acc = two_models("llip", "chunked", torch.float64)
    images, tokens = batch(cfg, torch.float64)
    twice = lambda x: torch.cat([x.flip(0), x])  # noqa: E731 -- this rank's rows second
    loss = one(images, tokens, gather=twice, offset=BATCH)
    loss.backward()
    backward(step := forward_step(acc, images, tokens, ACCUM, gather=twice, offset=BATCH))
    assert_same_step(one, acc, loss, step.loss, rtol=1e-10)


def test_a_loss_scale_is_applied_once_per_backward_pass():
    """fp16 training scales every backward pass by the loss scale (DeepSpeed does): the cached
    gradients, which come out scaled, are unscaled before the replayed passes scale them again."""
    cfg, one, acc = two_models("llip", "chunked", torch.float64)
    images, tokens = batch(cfg, torch.float64)
    loss = one(images, tokens)
    loss.backward()
    step = forward_step(acc, images, tokens, ACCUM)
    scale = 1024.0
    (step.loss * scale).backward()
    for build in step.more:
        (build() * scale).backward()
    for p in acc.parameters():
        p.grad /= scale
    assert_same_step(one, acc, loss, step.loss, rtol=1e-10)


class RandomMask:
    """A forward hook multiplying a tower's output by a dropout mask from the global RNG; it
    records the masks of the passes under autograd, or replays given masks."""

    def __init__(self, replay: list[torch.Tensor] | None = None):
        self.recorded: list[torch.Tensor] = []
        self.replay = replay

    def __call__(self, module, inputs, output):
        if self.replay is not None:
            mask = self.replay
        else:
            mask = F.dropout(torch.ones_like(output), p=0.3, training=True)
            if torch.is_grad_enabled():
                self.recorded.append(mask)
        return output * mask


@pytest.mark.parametrize("kind", ["llip", "siglip"])
def test_the_second_pass_replays_the_random_draws_of_the_first(kind):
    """With a random op in both towers, the accumulated step equals one batch that uses the
    masks of the passes under autograd; features cached with other draws than those of the
    re-encoding would give the head and the towers inconsistent gradients."""
    cfg, one, acc = two_models(kind, "chunked", torch.float64)
    images, tokens = batch(cfg, torch.float64)
    hooks = {"visual": RandomMask(), "text": RandomMask()}
    for name, hook in hooks.items():
        getattr(acc, name).register_forward_hook(hook)
    torch.manual_seed(123)
    step = forward_step(acc, images, tokens, ACCUM)
    after_first_pass = torch.get_rng_state()
    backward(step)
    # The replays rewound the RNG; the step leaves it where the first pass did, so that the
    # next step draws new masks instead of repeating this step's.
    assert torch.equal(torch.get_rng_state(), after_first_pass)
    for name, hook in hooks.items():
        assert len(hook.recorded) == ACCUM  # micro-batch 0, then the three replayed ones
        masks = torch.cat(hook.recorded)
        assert 0 < int((masks == 0).sum()) < masks.numel()
        getattr(one, name).register_forward_hook(RandomMask(replay=masks))
    loss = one(images, tokens)
    loss.backward()
    assert_same_step(one, acc, loss, step.loss, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def test_batch_split():
    cfg = load_config(None, ["batch_size=32", "micro_batch_size=4"])
    assert batch_split(cfg, 2) == (4, 4)
    assert batch_split(cfg, 8) == (4, 1)
    assert local_batch_size(cfg, 2) == 16
    assert batch_split(load_config(None, ["batch_size=32"]), 4) == (8, 1)  # 0: no accumulation


def test_micro_batch_size_that_does_not_divide_batch_size_fails_at_load():
    with pytest.raises(ConfigError, match=r"micro_batch_size=5 does not divide batch_size=32; .*4, 8, 16, 32"):
        load_config(None, ["batch_size=32", "micro_batch_size=5"])
    with pytest.raises(ConfigError, match="micro_batch_size must be >= 0"):
        load_config(None, ["micro_batch_size=-1"])


def test_micro_batch_size_that_does_not_divide_the_rank_batch_names_the_valid_ones():
    cfg = load_config(None, ["batch_size=32", "micro_batch_size=16"])
    with pytest.raises(ConfigError) as e:
        batch_split(cfg, 4)  # 8 per rank
    assert str(e.value) == ("micro_batch_size=16 does not divide the per-rank batch 8 (batch_size=32 over 4 ranks); "
                            "set micro_batch_size to one of 1, 2, 4, 8, or 0 for 8")
    assert "\n" not in str(e.value)


def test_llip_train_nproc_rejects_an_impossible_split_before_starting(tmp_path: Path):
    config = write_config(tmp_path / "config.yaml", batch_size=8, micro_batch_size=4)
    out = run([PYTHON, "-m", "llip_scale.train", str(config), f"run_dir={tmp_path / 'run'}", "--nproc", "4"])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "llip-train: config error: batch_size=8 is not divisible by the 4 ranks x micro_batch_size=4; set batch_size "
        "to a multiple of 16, or run on 1 or 2 ranks (or set micro_batch_size to 1 or 2, or 0)")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# through llip-train: 2 ranks x accum 2 equal 4 ranks x accum 1
# ---------------------------------------------------------------------------------------------

def _comparable(name: str, value: torch.Tensor) -> torch.Tensor:
    """Leave out the attention key biases: softmax ignores a shift shared by all keys, so their
    gradient is zero up to rounding, which AdamW turns into +-lr updates in any two runs."""
    if name.endswith("attn.in_proj.bias"):
        third = value.numel() // 3
        return torch.cat([value[:third], value[2 * third:]])
    return value


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])  # 2: gradients reduced in every backward pass
def test_two_ranks_accumulating_equal_four_ranks(tmp_path: Path, stage: int):
    from _train_helpers import metrics, tail, train_command

    from llip_scale.checkpoints.deepspeed_io import consolidated_state_dict

    config = write_config(tmp_path / "config.yaml", steps=2, checkpoint={"every": 0, "keep_last": 1},
                          eval={"heldout_samples": 0}, logging={"every": 1, "tensorboard": False, "progress": "lines"})
    runs = {}
    for nproc, micro in ((4, 0), (2, 2)):
        run_dir = tmp_path / f"n{nproc}"
        out = run(train_command(config, [f"run_dir={run_dir}", f"micro_batch_size={micro}",
                                         f"distributed.zero_stage={stage}"], nproc=nproc))
        assert out.returncode == 0, tail(out.stdout + out.stderr)
        assert f"{nproc} ranks x {4 // nproc} micro-batches of 2" in out.stderr
        runs[nproc] = run_dir
    four, two = (metrics(runs[n]) for n in (4, 2))
    losses = [[m["train/loss"] for m in log if "train/loss" in m] for log in (four, two)]
    assert len(losses[0]) == 2 and losses[0][0] != losses[0][1]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    tag = "checkpoints/step_0000000002"
    ref, got = (consolidated_state_dict(runs[n] / tag) for n in (4, 2))
    assert ref.keys() == got.keys()
    for name in ref:
        a, b = _comparable(name, ref[name]), _comparable(name, got[name])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5 * a.abs().max().item(), msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_an_accumulating_run_resumes_bit_for_bit(tmp_path: Path):
    """Resumed from its step-2 checkpoint, a run with 4 micro-batches per step ends with the
    step-4 checkpoint of the uninterrupted run, bit for bit (the RNG replay is deterministic)."""
    import shutil

    from _train_helpers import checkpoint_differences, tail, train_command

    config = write_config(tmp_path / "config.yaml", steps=4, micro_batch_size=2, checkpoint={"every": 2, "keep_last": 2},
                          eval={"heldout_samples": 0}, logging={"every": 1, "tensorboard": False, "progress": "lines"})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    out = run(train_command(config, [f"run_dir={whole}"], nproc=1))
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    last = "checkpoints/step_0000000004"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / last)
    out = run(train_command(config, [f"run_dir={resumed}"], nproc=1))
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    assert "step 2 of 4" in out.stderr  # it resumed rather than starting over
    assert checkpoint_differences(whole / last, resumed / last) == []
