#!/usr/bin/env python
"""Small-scale reproduction of Llip's claim: Llip vs SigLIP vs CLIP with the same towers, data,
steps and compute, several seeds each, zero-shot and retrieval on the held-out split; writes a
Markdown report (mean and std per method, per-seed numbers, the command, wall time).

    python tools/reproduce_small.py [--steps 400] [--seeds 0 1 2] [--jobs 2] \
        [--out benchmarks/REPRODUCTION.md] [--set key=value ...]

The runs are ``configs/experiments/reproduce_small.yaml`` (the tiny towers on the demo data,
generated into ``--data`` if absent) with the head switched per method; each trains in its own
process and evaluates once at the end. A run whose folder already holds a finished run of the
same length is reused, so an interrupted reproduction continues where it stopped. Anything below
the line ``<!-- notes -->`` of an existing report is kept when the report is rewritten.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llip_scale.config import Config, ConfigError, load_config, to_dict  # noqa: E402

if not os.environ.get("DS_ACCELERATOR"):  # the runs and the checkpoint reader start DeepSpeed
    import torch
    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"

CONFIG = "configs/experiments/reproduce_small.yaml"
NOTES_MARKER = "<!-- notes -->"
# The baselines pool the vision tower into one token where Llip keeps K mixture tokens.
METHODS: dict[str, list[str]] = {
    "llip": [],
    "siglip": ["model.head.kind=siglip", "model.vision.num_tokens=1"],
    "clip": ["model.head.kind=clip", "model.vision.num_tokens=1"],
}
METRICS: list[tuple[str, str]] = [
    ("zeroshot/top1", "zero-shot top-1"), ("zeroshot/top5", "zero-shot top-5"),
    ("zeroshot/colour", "zero-shot colour"), ("zeroshot/shape", "zero-shot shape"),
    ("retrieval/image_to_text_R@1", "I->T R@1"), ("retrieval/image_to_text_R@5", "I->T R@5"),
    ("retrieval/image_to_text_R@10", "I->T R@10"), ("retrieval/text_to_image_R@1", "T->I R@1"),
    ("retrieval/text_to_image_R@5", "T->I R@5"), ("retrieval/text_to_image_R@10", "T->I R@10"),
]


@dataclass
class Run:
    method: str
    seed: int
    config: Config
    overrides: list[str]

    @property
    def folder(self) -> Path:
        return Path(self.config.run_dir)


@dataclass
class Result:
    run: Run
    metrics: dict[str, float]
    seconds: float
    reused: bool


def plan(methods: list[str], seeds: list[int], runs_dir: Path, steps: int, extra: list[str]) -> list[Run]:
    """Every (method, seed) run with its validated config: a bad override fails before any compute."""
    runs = []
    for method in methods:
        for seed in seeds:
            # The method's switch comes last: it wins over the overrides given for every run.
            overrides = [f"seed={seed}", f"steps={steps}", f"run_dir={runs_dir / f'{method}_seed{seed}'}",
                         *extra, *METHODS[method]]
            run = Run(method, seed, load_config(CONFIG, overrides), overrides)
            check_folder(run)
            runs.append(run)
    return runs


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def check_folder(run: Run) -> None:
    """A run folder that already exists must hold this very run (finished or to be continued)."""
    saved = run.folder / "config.yaml"
    if not saved.is_file():
        return
    old, new = _flat(to_dict(load_config(saved))), _flat(to_dict(run.config))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        key = changed[0]
        raise ConfigError(f"{run.folder} holds a different run ({key}: {old.get(key)!r} there, {new.get(key)!r} now"
                          f"{f', and {len(changed) - 1} more' if len(changed) > 1 else ''}); pass another --runs "
                          "folder or delete it")


def _finished(run: Run) -> Optional[dict]:
    path = run.folder / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") == "done" and summary.get("steps") == run.config.steps else None


def attribute_accuracy(folder: Path, eval_dir: Path, threads: int) -> dict[str, float]:
    """Zero-shot top-1 split by attribute: how often the predicted class has the right colour (the
    first word of the demo set's "colour shape" class names) and the right shape (the rest). A model
    that knows colours but guesses shapes scores 1/8 top-1 and 5/8 top-5 on the 8 x 8 classes."""
    import torch

    from llip_scale.data import Tokenizer
    from llip_scale.eval.cli import load_for_eval
    from llip_scale.eval.run import zeroshot_scores

    torch.set_num_threads(threads)
    model, config = load_for_eval(folder, torch.device("cpu"), "auto")
    tokenize = Tokenizer(config["data"]["tokenizer"], model.cfg.text.context_length)
    scores, split = zeroshot_scores(model.eval(), tokenize, eval_dir, model.cfg.vision.image_size, torch.device("cpu"))
    names = [c.split(" ", 1) for c in split.classnames]
    pairs = list(zip(scores.argmax(dim=1).tolist(), split.labels))
    return {"zeroshot/colour": statistics.fmean(names[p][0] == names[t][0] for p, t in pairs),
            "zeroshot/shape": statistics.fmean(names[p][1:] == names[t][1:] for p, t in pairs)}


def execute(run: Run, threads: int) -> Result:
    """Train and evaluate one run in its own process (or reuse its finished folder)."""
    record = run.folder / "reproduce.json"  # wall time and the attribute accuracies of a finished run
    done = _finished(run)
    if done is not None and record.is_file():
        saved = json.loads(record.read_text())
        return Result(run, {**done, **saved["metrics"]}, saved["seconds"], reused=True)
    run.folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.time()
    with open(run.folder / "train.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "llip_scale.train", CONFIG, *run.overrides], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    done = _finished(run)
    if code != 0 or done is None:
        raise RuntimeError(f"{run.method} seed {run.seed} failed (exit code {code}); see {run.folder / 'train.log'}")
    extra = attribute_accuracy(run.folder, Path(run.config.eval.zeroshot_dir), threads)
    record.write_text(json.dumps({"seconds": seconds, "metrics": extra}))
    return Result(run, {**done, **extra}, seconds, reused=False)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[Result]) -> dict[str, dict[str, tuple[float, float]]]:
    """{method: {metric: (mean, std)}} over seeds."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for method in dict.fromkeys(r.run.method for r in results):
        mine = [r for r in results if r.run.method == method]
        out[method] = {key: mean_std([r.metrics[key] for r in mine]) for key, _ in METRICS}
    return out


def paired_differences(results: list[Result], a: str, b: str) -> dict[str, list[float]]:
    """Per metric, ``a - b`` for every seed both methods ran (same seed: same data order)."""
    by = {(r.run.method, r.run.seed): r.metrics for r in results}
    seeds = sorted(s for m, s in by if m == a and (b, s) in by)
    return {key: [by[(a, s)][key] - by[(b, s)][key] for s in seeds] for key, _ in METRICS}


def chance_levels(eval_dir: Path) -> dict[str, float]:
    """What guessing scores on the eval split, for scale."""
    from llip_scale.eval.evalsets import load_retrieval_split, load_zeroshot_split

    names = [c.split(" ", 1) for c in load_zeroshot_split(eval_dir).classnames]
    classes = len(names)
    captions = load_retrieval_split(eval_dir).captions
    images, texts = len(captions), sum(len(c) for c in captions)
    per_image = texts / images
    out = {"zeroshot/top1": 1 / classes, "zeroshot/top5": min(1.0, 5 / classes),
           # a class drawn at random shares the true class's colour (shape) this often
           "zeroshot/colour": statistics.fmean(sum(m[0] == n[0] for m in names) / classes for n in names),
           "zeroshot/shape": statistics.fmean(sum(m[1:] == n[1:] for m in names) / classes for n in names)}
    for k in (1, 5, 10):
        # An image is retrieved correctly when one of its captions is among k random picks.
        out[f"retrieval/image_to_text_R@{k}"] = 1 - math.comb(texts - round(per_image), k) / math.comb(texts, k)
        out[f"retrieval/text_to_image_R@{k}"] = min(1.0, k / images)
    return out


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _verdict(results: list[Result]) -> list[str]:
    lines = []
    for other in ("siglip", "clip"):
        diffs = paired_differences(results, "llip", other)
        if not diffs["zeroshot/top1"]:
            continue
        for key, name in METRICS:
            d = diffs[key]
            mean, std = mean_std(d)
            wins = sum(x > 0 for x in d)
            lines.append(f"| Llip - {other} | {name} | {100 * mean:+.1f} ± {100 * std:.1f} | {wins} of {len(d)} |")
    if not lines:
        return []
    return ["Paired differences (Llip minus the baseline on the same seed, in points; the last column "
            "counts the seeds where Llip is ahead):", "",
            "| comparison | metric | difference | Llip ahead |", "|---|---|---|---|", *lines, ""]


def total_wall_time(runs_dir: Path, wall: float, trained: int) -> float:
    """Wall time of every invocation that trained runs in ``runs_dir``, this one included."""
    path = runs_dir / "wall_time.json"
    total = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    if trained:
        total += wall
        path.write_text(json.dumps({"seconds": total}))
    return total


def render(results: list[Result], runs: list[Run], command: str, wall: float, total_wall: float,
           chance: dict[str, float], params: dict[str, int]) -> str:
    """The report, without the kept notes."""
    import torch

    agg = aggregate(results)
    cfg = runs[0].config
    seeds = sorted({r.seed for r in runs})
    reused = sum(r.reused for r in results)
    run_time = sum(r.seconds for r in results)
    lines = [
        "# Small-scale reproduction: Llip vs SigLIP vs CLIP", "",
        f"`{command}`", "",
        f"- Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `tools/reproduce_small.py`. "
        f"Wall time: {total_wall / 60:.1f} min to train and evaluate the {len(results)} runs"
        + (f" ({reused} of them trained by an earlier invocation; this one took {wall / 60:.1f} min)"
           if reused else "") + f"; the runs took {run_time / 60:.1f} min of process time together.",
        f"- Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, no GPU.",
        f"- Every run: `{CONFIG}`, the `{cfg.model.name}` towers ({cfg.model.vision.image_size} px images, "
        f"patch {cfg.model.vision.patch_size}, width {cfg.model.vision.width}, depth {cfg.model.vision.depth}; "
        f"text width {cfg.model.text.width}, depth {cfg.model.text.depth}), {cfg.steps} steps at batch "
        f"{cfg.batch_size} ({cfg.steps * cfg.batch_size:,} pairs seen), AdamW lr {cfg.optim.lr:g}, "
        f"{cfg.optim.warmup_steps} warmup steps then {cfg.optim.schedule}, seeds {', '.join(map(str, seeds))}. "
        f"Llip: K={cfg.model.vision.num_tokens} mixture tokens, {cfg.model.head.num_heads} mixing heads, "
        f"tau={cfg.model.head.tau:g}, sigmoid loss. SigLIP (sigmoid loss) and CLIP (InfoNCE): one pooled "
        "token, otherwise the same towers.",
        "- Parameters: " + ", ".join(f"{m} {n / 1e6:.2f}M" for m, n in params.items()) + ".",
        f"- Data: the demo set ({cfg.data.shards}); evaluation on its held-out split ({cfg.eval.zeroshot_dir}): "
        "zero-shot over every colour x shape class with the prompt templates (colour and shape: how often the "
        "top-1 class has the right colour, the right shape), retrieval with 5 captions per image.", "",
        "## Mean ± std over seeds (percent)", "",
    ]
    header = ["method", *(name for _, name in METRICS)]
    rows = [[m, *(f"{_pct(agg[m][k][0])} ± {_pct(agg[m][k][1])}" for k, _ in METRICS)] for m in agg]
    rows.append(["chance", *(_pct(chance[k]) for k, _ in METRICS)])
    lines += _table(header, rows) + [""]
    lines += _verdict(results)
    lines += ["## Per run (percent)", ""]
    per_run = [[r.run.method, str(r.run.seed), *(_pct(r.metrics[k]) for k, _ in METRICS), f"{r.seconds:.0f}"]
               for r in results]
    lines += _table(["method", "seed", *(name for _, name in METRICS), "wall s"], per_run) + [""]
    return "\n".join(lines)


def kept_notes(path: Path) -> str:
    if not path.is_file():
        return f"{NOTES_MARKER}\n"
    text = path.read_text()
    return text[text.index(NOTES_MARKER):] if NOTES_MARKER in text else f"{NOTES_MARKER}\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="runs trained at the same time; the cores are split between them")
    p.add_argument("--data", type=Path, default=Path("data/demo"), help="demo data folder (generated if absent)")
    p.add_argument("--runs", type=Path, default=Path("runs/reproduce"), help="folder of the run folders")
    p.add_argument("--out", type=Path, default=Path("benchmarks/REPRODUCTION.md"))
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run, e.g. model.head.tau=1")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "tools/reproduce_small.py", *(sys.argv[1:] if argv is None else argv)])
    os.chdir(REPO)
    data = [f"data.shards={args.data / 'train'}", f"data.tokenizer={args.data / 'tokenizer.model'}",
            f"eval.zeroshot_dir={args.data / 'eval'}", f"eval.retrieval_dir={args.data / 'eval'}"]
    from llip_scale.demo import ensure_data
    ensure_data(args.data)
    try:
        steps = args.steps or load_config(CONFIG).steps
        runs = plan(args.methods, args.seeds, args.runs, steps, data + args.overrides)
    except ConfigError as e:
        print(f"reproduce_small: config error: {e}", file=sys.stderr)
        return 2
    from llip_scale.model.summary import parameter_counts
    params = {m: parameter_counts(next(r for r in runs if r.method == m).config.model)["total"]
              for m in args.methods}
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    start = time.time()
    print(f"reproduce_small: {len(runs)} runs of {steps} steps, {args.jobs} at a time, logs in {args.runs}/*/train.log",
          flush=True)
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            results = []
            for result in pool.map(lambda r: execute(r, threads), runs):
                print(f"  {result.run.method} seed {result.run.seed}: zero-shot top-1 "
                      f"{_pct(result.metrics['zeroshot/top1'])}%, I->T R@1 "
                      f"{_pct(result.metrics['retrieval/image_to_text_R@1'])}% "
                      f"({'reused' if result.reused else f'{result.seconds:.0f} s'})", flush=True)
                results.append(result)
    except RuntimeError as e:
        print(f"reproduce_small: {e}", file=sys.stderr)
        return 1
    wall = time.time() - start
    total = total_wall_time(args.runs, wall, trained=sum(not r.reused for r in results))
    report = render(results, runs, command, wall, total, chance_levels(args.data / "eval"), params)
    notes = kept_notes(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n" + notes)
    print(f"reproduce_small: wrote {args.out} ({(time.time() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
