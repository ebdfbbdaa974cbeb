"""The trainer's parts that need no process group: config, DeepSpeed config, parameter groups,
schedule, synthetic data, metrics, held-out metrics, the CLI's errors; and one short run that
stops on persistent non-finite losses."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch
from _train_helpers import run, tail, train_command, write_config

from llip_scale.config import ConfigError, load_config


@pytest.fixture
def small(tmp_path):
    return write_config(tmp_path / "config.yaml")


# -- config and DeepSpeed config ------------------------------------------------------------------

def test_deepspeed_section_is_merged_last(small):
    from llip_scale.train.engine import deepspeed_config

    cfg = load_config(small, ["distributed.zero_stage=3", "optim.grad_clip=1.0",
                              "distributed.deepspeed={zero_optimization: {stage3_prefetch_bucket_size: 1000, "
                              "stage3_max_live_parameters: 5000}, bf16: {enabled: true}}"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 1000,
                                       "stage3_max_live_parameters": 5000}
    assert ds["bf16"] == {"enabled": True}


def test_deepspeed_section_cannot_change_the_stage(small):
    with pytest.raises(ConfigError, match="set distributed.zero_stage instead"):
        load_config(small, ["distributed.deepspeed={zero_optimization: {stage: 2}}"])


def test_bad_signal_and_batch_split_are_reported(small):
    from llip_scale.train.engine import local_batch_size

    with pytest.raises(ConfigError, match="preempt_signals: 'SIGBOGUS'"):
        load_config(small, ["distributed.preempt_signals=[SIGBOGUS]"])
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by the 3 ranks"):
        local_batch_size(load_config(small), 3)


def test_cli_reports_a_config_error_in_one_line(small, capsys):
    from llip_scale.train.loop import EXIT_CONFIG, cli

    assert cli([str(small), "optim.lrr=1e-3"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err == "llip-train: config error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"


# -- optimizer pieces -----------------------------------------------------------------------------

def test_no_weight_decay_on_gains_biases_and_logit_parameters(small):
    from llip_scale.model import build_model
    from llip_scale.train.engine import param_groups

    model = build_model(load_config(small).model)
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert decayed | plain == set(names.values()) and not decayed & plain
    assert {"head.logit_scale", "head.logit_bias", "visual.ln_pre.weight", "text.ln_final.bias",
            "visual.transformer.resblocks.0.attn.in_proj.bias"} <= plain
    assert {"head.out_proj", "image_proj.k_proj", "text.token_embedding.weight", "q_proj.weight",
            "visual.transformer.resblocks.0.mlp.c_fc.weight"} <= decayed


def test_warmup_then_cosine():
    from llip_scale.train.engine import WarmupCosine

    s = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    assert WarmupCosine(2, 10, kind="constant")(7) == 1.0


# -- synthetic data -------------------------------------------------------------------------------

def _loader(rank: int, world: int, batch: int):
    from llip_scale.data.config import DataConfig
    from llip_scale.data.synthetic import SyntheticLoader, SyntheticTokenizer

    tok = SyntheticTokenizer(vocab_size=128, context_length=16)
    return SyntheticLoader(DataConfig(source="synthetic"), batch, rank, world, 16, tok, seed=7)


def test_synthetic_batches_do_not_depend_on_the_number_of_ranks():
    one = next(iter(_loader(0, 1, 8)))
    halves = [next(iter(_loader(r, 2, 4))) for r in range(2)]
    assert torch.equal(one.images, torch.cat([h.images for h in halves]))
    assert torch.equal(one.tokens, torch.cat([h.tokens for h in halves]))
    assert (one.tokens == 2).sum(dim=1).eq(1).all()  # one EOT per caption


def test_synthetic_stream_resumes_after_the_saved_batch():
    stream = iter(_loader(1, 2, 4))
    batches = [next(stream) for _ in range(3)]
    resumed = _loader(1, 2, 4)
    resumed.load_state_dict(batches[0].state)
    again = next(iter(resumed))
    assert torch.equal(again.images, batches[1].images) and torch.equal(again.tokens, batches[1].tokens)
    with pytest.raises(ValueError, match="global batch 8"):
        _loader(0, 1, 4).load_state_dict(batches[0].state)


# -- metrics and held-out numbers -----------------------------------------------------------------

def test_metrics_drop_entries_past_the_resume_point(tmp_path):
    from llip_scale.train.metrics import MetricsWriter, read_jsonl

    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 6):
        w.write(step, {"train/loss": 1.0 / step, "train/grad_norm": float("nan")})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # cut short by a kill
    MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=3).close()
    entries = read_jsonl(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in entries] == [1, 2, 3]
    assert entries[0]["train/grad_norm"] == "nan"


def test_progress_lines_and_rates():
    from llip_scale.train.metrics import Progress, StepMeter

    meter = StepMeter(samples_per_step=8, flops_per_sample=1e9, peak_flops=1e12)
    meter.waited(0.0)
    meter.stepped()
    rates = meter.rates()
    assert rates["perf/samples_per_s"] == pytest.approx(8 * rates["perf/steps_per_s"])
    assert rates["perf/mfu"] == pytest.approx(rates["perf/samples_per_s"] * 1e-3)
    stream = io.StringIO()
    progress = Progress(total=10, start=0, mode="auto", enabled=True, stream=stream)  # not a TTY: lines
    progress.update(5, {"train/loss": 1.5, "train/lr": 1e-3, **rates})
    progress.message("saved")
    assert stream.getvalue().startswith("step 5/10 (50%) loss 1.5000  lr 1.00e-03")
    assert stream.getvalue().endswith("saved\n")


def test_heldout_metrics_from_a_score_matrix():
    from llip_scale.eval.heldout import _blocks_loss, _recall_at_1

    scores = torch.full((4, 4), -5.0)
    scores[torch.arange(4), torch.arange(4)] = 5.0
    scores[3, 0] = 6.0  # image 3 prefers text 0; text 0 prefers image 3
    i2t, t2i = _recall_at_1(scores)
    assert (i2t, t2i) == (0.75, 0.75)
    expected = torch.nn.functional.softplus(-(2 * torch.eye(4) - 1) * scores[:4, :4]).sum() / 4
    assert _blocks_loss(scores, 4, "siglip") == pytest.approx(float(expected))
    two = [_blocks_loss(scores[i:i + 2, i:i + 2], 2, "siglip") for i in (0, 2)]
    assert _blocks_loss(scores, 2, "siglip") == pytest.approx(sum(two) / 2)


# -- a run whose loss never becomes finite ---------------------------------------------------------

@pytest.mark.slow
def test_persistent_nonfinite_loss_stops_the_run_with_one_line(tmp_path):
    config = write_config(tmp_path / "config.yaml", optim={"lr": 1e30, "warmup_steps": 0, "max_nonfinite_steps": 3})
    out = run(train_command(config, [f"run_dir={tmp_path / 'run'}", "steps=20", "checkpoint.every=0"], nproc=1))
    assert out.returncode == 1, tail(out.stdout + out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("llip-train: error:")]
    assert len(errors) == 1 and "non-finite for 3 consecutive steps" in errors[0]
    assert "update skipped (1 in a row)" in out.stderr
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(entries[0]["train/loss"])  # the first step was fine; its update blew up
    assert entries[-1]["train/nonfinite_steps"] >= 2
