"""tools/reproduce_small.py: every variant x seed trained and evaluated (equal steps, equal FLOPs,
the release inits), the report's means and stds computed from the runs' own summaries and the
tool's end-of-run metrics, the curves and mixing pictures written, reruns reusing finished runs and
keeping the notes, and a bad override refused before any training.

Data: a small set made by tools/make_demo_data.py with the options the tool uses; the towers are
shrunk and each run trains 2 steps.
"""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _train_helpers import REPO, run, run_env, tail

pytestmark = pytest.mark.slow

TOOL = REPO / "tools" / "reproduce_small.py"
SMALL = ["model.vision.image_size=32", "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
         "model.vision.mlp_dim=64", "model.vision.num_tokens=4", "model.text.width=32", "model.text.depth=1",
         "model.text.heads=2", "model.text.mlp_dim=64", "model.head.embed_dim=32", "model.head.num_heads=2",
         "batch_size=8", "optim.warmup_steps=1", "data.shuffle_buffer=16", "eval.heldout_samples=16",
         "eval.batch_size=16", "eval.mixing_images=0", "logging.every=1"]
RUNS = [(v, s) for v in ("llip", "siglip", "clip", "llip-flops") for s in (0, 1)] + \
    [("llip-release", 0), ("siglip-release", 0)]
PNG = b"\x89PNG\r\n\x1a\n"


def _tool():
    spec = importlib.util.spec_from_file_location("reproduce_small", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_small"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def testbed(tmp_path_factory) -> Path:
    """The tool's data options at a small size (the tool generates the full set only if absent)."""
    out = tmp_path_factory.mktemp("testbed")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), str(out), "--train", "128",
                    "--per-shard", "64", "--eval-zeroshot", "64", "--eval-retrieval", "24", "--objects", "2", "4",
                    "--no-scene-caption", "--heldout", "32", "--compositional", "24"],
                   cwd=REPO, env=run_env(), check=True, capture_output=True)
    return out


def _command(data: Path, tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TOOL), "--seeds", "0", "1", "--steps", "2", "--eval-every", "1", "--jobs", "2",
            "--data", str(data), "--runs", str(tmp / "runs"), "--out", str(tmp / "REPRODUCTION.md"),
            "--mixing-images", "1", *extra, "--set", *SMALL]


@pytest.fixture(scope="module")
def reproduction(testbed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reproduce")
    first = run(_command(testbed, tmp))
    return {"tmp": tmp, "first": first}


def _cells(report: str, section: str, label: str) -> list[str]:
    """The cells of the row starting with ``label`` in the first table after ``section``."""
    text = report[report.index(section):]
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def _metrics(tmp: Path, variant: str, seed: int) -> dict:
    folder = tmp / "runs" / f"{variant}_seed{seed}"
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(json.loads((folder / "reproduce.json").read_text())["metrics"])
    return summary


def test_every_variant_and_seed_is_trained_and_summarised(reproduction):
    first, tmp = reproduction["first"], reproduction["tmp"]
    assert first.returncode == 0, tail(first.stdout + first.stderr)
    report = (tmp / "REPRODUCTION.md").read_text()
    tool = _tool()
    for variant, seed in RUNS:
        summary = json.loads((tmp / "runs" / f"{variant}_seed{seed}" / "summary.json").read_text())
        assert summary["status"] == "done", variant
    assert not (tmp / "runs" / "llip-release_seed1").exists()  # the release inits: first seed only
    for section, names in (("## Equal steps", ("llip", "siglip", "clip")),
                           ("## Equal training FLOPs", ("siglip", "clip"))):
        for variant in names:
            cells = _cells(report, section, variant)
            for column, (key, _) in enumerate(tool.METRICS, start=1):
                values = [_metrics(tmp, variant, s)[key] for s in (0, 1)]
                mean, std = statistics.fmean(values), statistics.stdev(values)
                assert cells[column] == f"{100 * mean:.1f} ± {100 * std:.1f}", (section, variant, key)
    # The end-of-run metrics are real accuracies and recalls of their own evaluations.
    for variant, seed in RUNS:
        m = _metrics(tmp, variant, seed)
        assert all(0.0 <= m[key] <= 1.0 for key, _ in tool.METRICS)
        assert m["mixed/image_to_text_R@5"] >= m["mixed/image_to_text_R@1"]
    assert "python tools/reproduce_small.py --seeds 0 1 --steps 2" in report


def test_variants_switch_the_head_the_bias_init_and_the_steps(reproduction):
    tmp = reproduction["tmp"]

    def config(variant: str) -> dict:
        return yaml.safe_load((tmp / "runs" / f"{variant}_seed1" / "config.yaml").read_text())

    llip, siglip, clip, flops = (config(v) for v in ("llip", "siglip", "clip", "llip-flops"))
    # The variant's switch wins over --set: a baseline pools one token whatever K the runs set.
    assert (siglip["model"]["head"]["kind"], siglip["model"]["vision"]["num_tokens"], siglip["seed"]) == ("siglip", 1, 1)
    assert (clip["model"]["head"]["kind"], clip["model"]["vision"]["num_tokens"]) == ("clip", 1)
    assert (llip["model"]["head"]["kind"], llip["model"]["vision"]["num_tokens"]) == ("llip", 4)
    # The sigmoid-loss runs start the bias at -ln(batch); the release variants keep -10.
    for cfg in (llip, siglip, flops):
        assert cfg["model"]["head"]["init_logit_bias"] == pytest.approx(-math.log(8))
    release = yaml.safe_load((tmp / "runs" / "siglip-release_seed0" / "config.yaml").read_text())
    assert release["model"]["head"]["init_logit_bias"] == -10.0
    assert [llip["eval"]["every"], llip["eval"]["retrieval_dir"].endswith("objects")] == [1, True]


def test_equal_flops_steps_follow_the_flops_model(testbed):
    tool = _tool()
    data = [f"data.shards={testbed / 'train'}", f"data.tokenizer={testbed / 'tokenizer.model'}",
            f"eval.zeroshot_dir={testbed / 'eval'}", f"eval.retrieval_dir={testbed / 'eval'}"]
    # At the recorded size Llip's K tokens and head cost about 9% more per step than SigLIP's.
    steps = tool.equal_flops_steps(800, data)
    llip = tool.load_config(tool.CONFIG, data + ["model.head.bias_init=batch"])
    siglip = tool.load_config(tool.CONFIG, data + list(tool.VARIANTS["siglip"].overrides))
    assert steps == round(800 * tool.train_flops(siglip) / tool.train_flops(llip))
    assert 700 < steps < 790


def test_the_curves_and_the_mixing_pictures_are_written(reproduction):
    tmp = reproduction["tmp"]
    report = (tmp / "REPRODUCTION.md").read_text()
    figures = tmp / "reproduction"
    assert (figures / "curves.png").read_bytes()[:8] == PNG
    assert (figures / "mixing-0.png").read_bytes()[:8] == PNG and not (figures / "mixing-1.png").exists()
    assert "![metrics against steps](reproduction/curves.png)" in report
    assert "![mixing 0](reproduction/mixing-0.png)" in report
    mean, per_head = report.split("1 = disjoint tokens): ")[1].split(".\n")[0].split(" over heads; per head ")
    per_head = [float(d) for d in per_head.split(", ")]
    assert len(per_head) == 2 and all(0.0 <= d <= 1.0 for d in per_head)  # num_heads=2
    assert float(mean) == pytest.approx(statistics.fmean(per_head), abs=1e-3)
    # The held-out loss table has one column per evaluation (eval.every=1: steps 1 and 2), read
    # back from the runs' metrics.
    cells = _cells(report, "## Held-out loss", "clip")
    losses = [statistics.fmean(dict(_tool().curves(tmp / "runs" / f"clip_seed{s}")["eval/loss"])[step]
                                for s in (0, 1)) for step in (1, 2)]
    assert cells[1:] == [f"{v:.3f}" for v in losses]
    # The binding table holds each run's cached rates (binding.json), mean over seeds.
    cells = _cells(report, "## What the first image", "siglip")
    rates = [json.loads((tmp / "runs" / f"siglip_seed{s}" / "binding.json").read_text())["bind/colour"] for s in (0, 1)]
    assert cells[1] == f"{100 * statistics.fmean(rates):.1f} ± {100 * statistics.stdev(rates):.1f}"
    assert "| random image |" in report
    assert "| llip-release seed 0 | -10 |" in report and "| siglip seed 0 | -ln(batch) = -2.08 |" in report


def test_curves_keep_one_value_per_step_after_a_resume(tmp_path):
    lines = [{"step": 10, "train/loss": 5.0}, {"step": 20, "train/loss": 4.0},
             {"step": 20, "train/loss": 4.0, "eval/loss": 3.0},  # a resumed run logs step 20 again
             {"step": 30, "train/loss": 3.5, "note": "text is ignored"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = _tool().curves(tmp_path)
    assert out["train/loss"] == [(10, 5.0), (20, 4.0), (30, 3.5)] and out["eval/loss"] == [(20, 3.0)]


def test_a_rerun_reuses_the_runs_and_keeps_the_notes(reproduction, testbed):
    tmp = reproduction["tmp"]
    out = tmp / "REPRODUCTION.md"
    out.write_text(out.read_text() + "Hand-written analysis that must survive.\n")
    again = run(_command(testbed, tmp))
    assert again.returncode == 0, tail(again.stdout + again.stderr)
    assert again.stdout.count("(reused)") == len(RUNS)
    text = out.read_text()
    assert f"({len(RUNS)} of them trained by an earlier invocation; this one took" in text
    assert text.endswith("<!-- notes -->\nHand-written analysis that must survive.\n")


def test_a_folder_of_other_runs_is_refused_before_any_training(reproduction, testbed):
    tmp = reproduction["tmp"]
    out = run(_command(testbed, tmp) + ["model.head.tau=1"])
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "llip_seed0 holds a different run (model.head.tau: 5.0 there, 1.0 now)" in out.stderr


def test_a_bad_override_stops_before_any_training(testbed, tmp_path):
    out = run(_command(testbed, tmp_path, "--methods", "llip") + ["model.head.tau=-1"])
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "tau must be > 0" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_chance_levels_of_the_eval_folders(testbed):
    chance = _tool().chance_levels(testbed)
    # 64 joint classes, 8 colours, 8 shapes; 24 mixed retrieval images; 24 object scenes.
    assert chance["zeroshot/top1"] == pytest.approx(1 / 64)
    assert chance["colour/top1"] == chance["shape/top1"] == pytest.approx(1 / 8)
    assert chance["retrieval/text_to_image_R@5"] == pytest.approx(5 / 24)
    assert chance["mixed/text_to_image_R@1"] == pytest.approx(1 / 24)
    objects = [json.loads(x) for x in (testbed / "eval" / "objects" / "retrieval.jsonl").read_text().splitlines()]
    texts = sum(len(o["captions"]) for o in objects)
    per_image = round(texts / len(objects))
    assert chance["retrieval/image_to_text_R@1"] == pytest.approx(1 - math.comb(texts - per_image, 1) / math.comb(texts, 1))


def test_binding_reads_what_the_first_image_shares_with_the_caption():
    import torch

    captions = [["a small red star on the left.", "a large blue ring at the top."],
                ["a small red circle in the center.", "a large green star on the left."],
                ["a small black cross at the bottom."]]
    # Captions 0-4 (flattened) each send their best score to image 1, 0, 0, 2, 1.
    best = [1, 0, 0, 2, 1]
    scores = torch.zeros(3, 5)
    scores[best, range(5)] = 1.0
    out = _tool().binding(scores, captions)
    # red star left -> image 1: red circle (colour), green star left (shape, place but other colour).
    # blue ring top -> image 0: its own (all). red circle center -> image 0: red star (colour).
    # green star left -> image 2: nothing. black cross bottom -> image 1: nothing.
    assert out["bind/colour"] == pytest.approx(3 / 5)
    assert out["bind/shape"] == pytest.approx(2 / 5)
    assert out["bind/colour+place"] == pytest.approx(1 / 5)
    assert out["bind/colour+shape"] == pytest.approx(1 / 5)
    assert out["bind/all"] == pytest.approx(1 / 5)
    # An image drawn at random holds the caption's own object 1/3 of the time (captions are unique).
    assert out["bind/all_chance"] == pytest.approx(1 / 3)
    # red (2 of 3 images), blue (1), red (2), green (1), black (1) -> (2 + 1 + 2 + 1 + 1) / 15
    assert out["bind/colour_chance"] == pytest.approx(7 / 15)
