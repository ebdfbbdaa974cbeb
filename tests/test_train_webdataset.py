"""The trainer on real shards: the webdataset loader, its resumable state, and the evaluations
on an eval folder (zero-shot, retrieval, held-out pairs), through ``llip-train`` in one process.

Data: the small demo set of conftest.py (128 training scenes, its tokenizer and
eval folder). The run stops after 4 steps, then the same command with ``steps=6`` continues it
from its step-4 checkpoint, loader state included.
"""
from __future__ import annotations

import io
import json
import sys

import pytest
from _train_helpers import REPO, metrics, run, tail, train_command, write_config
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wds")
    config = write_config(
        tmp / "config.yaml",
        data={"source": "webdataset", "shards": str(demo_data / "train"),
              "tokenizer": str(demo_data / "tokenizer.model"), "workers": 1, "shuffle_buffer": 16},
        model={"vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64,
                          "num_tokens": 4},
               "text": {"vocab_size": 1024, "context_length": 32, "width": 32, "depth": 1, "heads": 2,
                        "mlp_dim": 64},
               "head": {"embed_dim": 32, "num_heads": 2}},
        eval={"zeroshot_dir": str(demo_data / "eval"), "retrieval_dir": str(demo_data / "eval"),
              "heldout_samples": 16, "batch_size": 16},
        checkpoint={"every": 2, "keep_last": 2})
    run_dir = tmp / "run"
    first = run(train_command(config, [f"run_dir={run_dir}", "steps=4"], nproc=1))
    second = run(train_command(config, [f"run_dir={run_dir}", "steps=6"], nproc=1))
    return {"first": first, "second": second, "run": run_dir}


def test_trains_on_shards_and_evaluates_on_the_folder(runs):
    assert runs["first"].returncode == 0, tail(runs["first"].stdout + runs["first"].stderr)
    summary = json.loads((runs["run"] / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 6
    assert summary["eval/pairs"] == 16  # held-out pairs: the first caption of 16 retrieval images
    for key in ("eval/loss", "eval/image_to_text_r1", "zeroshot/top1", "retrieval/image_to_text_R@1"):
        assert 0 <= summary[key] < 100, key


def test_rerun_with_more_steps_continues_from_the_loader_state(runs):
    second = runs["second"]
    assert second.returncode == 0, tail(second.stdout + second.stderr)
    assert "step_0000000004 (step 4)" in second.stderr
    steps = [m["step"] for m in metrics(runs["run"]) if "train/loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (runs["run"] / "checkpoints").glob("step_*")) == [
        "step_0000000004", "step_0000000006"]


def test_llip_eval_on_the_trainers_checkpoint_reproduces_its_final_numbers(runs, tmp_path):
    """``llip-eval RUN`` (newest complete checkpoint, consolidated offline) = the trainer's final eval."""
    out_json = tmp_path / "eval.json"
    out = run([sys.executable, "-m", "llip_scale.eval.cli", str(runs["run"]), "--json", str(out_json),
               "--taus", "1.0"])
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    got = json.loads(out_json.read_text())
    summary = json.loads((runs["run"] / "summary.json").read_text())
    for key in ("zeroshot/top1", "zeroshot/top5", "retrieval/image_to_text_R@1", "retrieval/text_to_image_R@5"):
        assert got[key] == pytest.approx(summary[key], abs=1e-6), key
    assert "zeroshot/top1@tau=1" in got


def test_an_export_carries_its_tokenizer_and_preprocessing(runs, demo_data, tmp_path):
    """tools/export_checkpoint.py RUN OUT: OUT alone loads (model, transforms, tokenizer) and gives
    the run's scores; llip-eval on OUT needs no --tokenizer and reproduces the final retrieval."""
    import torch

    import llip_scale
    from llip_scale.data import Tokenizer

    out = run([sys.executable, str(REPO / "tools" / "export_checkpoint.py"), str(runs["run"]), str(tmp_path / "m")])
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    model, _, preprocess = llip_scale.create_model_and_transforms(tmp_path / "m")
    tokenizer = llip_scale.get_tokenizer(tmp_path / "m")
    image = Image.open(sorted((demo_data / "eval" / "images").glob("rt-*.jpg"))[0])
    captions = ["a red circle", "a blue square above a green triangle"]
    scores = model.score(preprocess(image)[None], tokenizer(captions))
    torch.testing.assert_close(tokenizer(captions), Tokenizer(str(demo_data / "tokenizer.model"), 32)(captions))
    from_run = llip_scale.create_model(runs["run"])  # the run folder: its newest complete checkpoint
    torch.testing.assert_close(scores, from_run.score(preprocess(image)[None], tokenizer(captions)))
    out_json = tmp_path / "eval.json"
    out = run([sys.executable, "-m", "llip_scale.eval.cli", str(tmp_path / "m"), "--retrieval",
               str(demo_data / "eval"), "--json", str(out_json)])
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    summary = json.loads((runs["run"] / "summary.json").read_text())
    got = json.loads(out_json.read_text())
    assert got["retrieval/text_to_image_R@5"] == pytest.approx(summary["retrieval/text_to_image_R@5"], abs=1e-6)


def test_llip_eval_reports_a_missing_checkpoint_in_one_line(tmp_path):
    out = run([sys.executable, "-m", "llip_scale.eval.cli", str(tmp_path)])
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "holds no complete checkpoint" in out.stderr


def test_visualize_mixing_draws_the_checkpoints_weights(runs, demo_data, tmp_path):
    image = sorted((demo_data / "eval" / "images").glob("rt-*.jpg"))[0]
    out_png = tmp_path / "mix.png"
    out = run([sys.executable, str(REPO / "tools" / "visualize_mixing.py"), str(runs["run"]), str(image),
               "a red circle", "a blue square above a green triangle", "--out", str(out_png)])
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    assert "2 captions x 2 heads x 4 tokens" in out.stdout
    assert out_png.stat().st_size > 5000


def test_each_evaluation_logs_the_mixing_picture_to_tensorboard(runs):
    """One figure per evaluation (steps 4 and 6, across the resume) of the first retrieval image
    with its 5 captions: a PNG tall enough to hold a row per caption."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["run"] / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "eval/mixing/0" in events.Tags()["images"]
    pictures = events.Images("eval/mixing/0")
    assert [p.step for p in pictures] == [4, 6]
    png = Image.open(io.BytesIO(pictures[-1].encoded_image_string))
    assert png.format == "PNG" and png.height > 300 and png.width > 300
