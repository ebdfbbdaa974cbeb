"""tools/reproduce_small.py: every method x seed trained and evaluated, the report's means and
stds computed from the runs' own summaries (and the zero-shot colour / shape accuracies), reruns reusing finished runs and keeping the notes,
and a bad override refused before any training.

Data: the small demo set of conftest.py; the towers are shrunk and each run trains 2 steps.
"""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import yaml
from _train_helpers import REPO, run, tail

pytestmark = pytest.mark.slow

TOOL = REPO / "tools" / "reproduce_small.py"
SMALL = ["model.vision.image_size=32", "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
         "model.vision.mlp_dim=64", "model.vision.num_tokens=4", "model.text.width=32", "model.text.depth=1",
         "model.text.heads=2", "model.text.mlp_dim=64", "model.head.embed_dim=32", "model.head.num_heads=2",
         "batch_size=8", "optim.warmup_steps=1", "data.shuffle_buffer=16", "eval.heldout_samples=16",
         "eval.batch_size=16", "eval.mixing_images=0"]


def _tool():
    spec = importlib.util.spec_from_file_location("reproduce_small", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_small"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _command(data: Path, tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TOOL), "--seeds", "0", "1", "--steps", "2", "--jobs", "2", "--data", str(data),
            "--runs", str(tmp / "runs"), "--out", str(tmp / "REPRODUCTION.md"), *extra, "--set", *SMALL]


@pytest.fixture(scope="module")
def reproduction(demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reproduce")
    first = run(_command(demo_data, tmp))
    return {"tmp": tmp, "first": first}


def _cell(report: str, method: str, column: int) -> str:
    row = next(line for line in report.splitlines() if line.startswith(f"| {method} |"))
    return row.strip("|").split("|")[column].strip()


def test_every_method_and_seed_is_trained_and_summarised(reproduction):
    first, tmp = reproduction["first"], reproduction["tmp"]
    assert first.returncode == 0, tail(first.stdout + first.stderr)
    report = (tmp / "REPRODUCTION.md").read_text()
    tool = _tool()
    for column, (key, _) in enumerate(tool.METRICS, start=1):
        for method in ("llip", "siglip", "clip"):
            values = []
            for seed in (0, 1):
                folder = tmp / "runs" / f"{method}_seed{seed}"
                summary = json.loads((folder / "summary.json").read_text())
                assert summary["status"] == "done" and summary["steps"] == 2
                summary.update(json.loads((folder / "reproduce.json").read_text())["metrics"])
                values.append(summary[key])
                # A right top-1 class has the right colour and shape; both right make it right.
                top1, colour, shape = summary["zeroshot/top1"], summary["zeroshot/colour"], summary["zeroshot/shape"]
                assert colour + shape - 1 - 1e-6 <= top1 <= min(colour, shape) + 1e-6
            mean, std = statistics.fmean(values), statistics.stdev(values)
            assert _cell(report, method, column) == f"{100 * mean:.1f} ± {100 * std:.1f}", (method, key)
    config = yaml.safe_load((tmp / "runs" / "siglip_seed1" / "config.yaml").read_text())
    # The method switch wins over --set: a baseline pools one token whatever K the runs set.
    assert (config["model"]["head"]["kind"], config["model"]["vision"]["num_tokens"], config["seed"]) == ("siglip", 1, 1)
    llip = yaml.safe_load((tmp / "runs" / "llip_seed0" / "config.yaml").read_text())
    assert (llip["model"]["head"]["kind"], llip["model"]["vision"]["num_tokens"]) == ("llip", 4)
    assert "Llip - siglip | zero-shot top-1 |" in report and "Llip - clip | T->I R@10 |" in report
    assert "python tools/reproduce_small.py --seeds 0 1 --steps 2" in report


def test_a_rerun_reuses_the_runs_and_keeps_the_notes(reproduction, demo_data):
    tmp = reproduction["tmp"]
    out = tmp / "REPRODUCTION.md"
    out.write_text(out.read_text() + "Hand-written analysis that must survive.\n")
    again = run(_command(demo_data, tmp))
    assert again.returncode == 0, tail(again.stdout + again.stderr)
    assert again.stdout.count("(reused)") == 6
    text = out.read_text()
    assert "(6 of them trained by an earlier invocation; this one took 0.0 min)" in text
    assert text.endswith("<!-- notes -->\nHand-written analysis that must survive.\n")


def test_a_folder_of_other_runs_is_refused_before_any_training(reproduction, demo_data):
    tmp = reproduction["tmp"]
    out = run(_command(demo_data, tmp) + ["model.head.tau=1"])
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "llip_seed0 holds a different run (model.head.tau: 5.0 there, 1.0 now)" in out.stderr


def test_a_bad_override_stops_before_any_training(demo_data, tmp_path):
    out = run(_command(demo_data, tmp_path, "--methods", "llip") + ["model.head.tau=-1"])
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "tau must be > 0" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_chance_levels_of_the_eval_split(demo_data):
    chance = _tool().chance_levels(demo_data / "eval")
    # 64 classes; 24 retrieval images with 5 captions each.
    assert chance["zeroshot/top1"] == pytest.approx(1 / 64)
    assert chance["zeroshot/top5"] == pytest.approx(5 / 64)
    assert chance["retrieval/text_to_image_R@5"] == pytest.approx(5 / 24)
    assert chance["retrieval/image_to_text_R@1"] == pytest.approx(5 / 120)
    assert chance["retrieval/image_to_text_R@10"] == pytest.approx(1 - math.comb(115, 10) / math.comb(120, 10))
