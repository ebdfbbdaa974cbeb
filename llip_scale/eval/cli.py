"""``llip-eval MODEL``: zero-shot and retrieval for a training run, checkpoint, export or imported model.

MODEL -> a run folder (its newest complete checkpoint), a ``step_*`` checkpoint folder (any
ZeRO stage: consolidated offline, in one process), an exported folder or one written by
``tools/import_official.py`` -> the model and its tokenizer. Then either or both of:

- ``--dataset NAME=ROOT`` (repeatable): benchmark sets in their native layouts
  (:mod:`llip_scale.eval.datasets`), all checked before the model is loaded -> one row per set
  (:mod:`llip_scale.eval.suite`) -> a Markdown table on stdout, ``--markdown`` / ``--json`` files
  rewritten after every set;
- ``--zeroshot`` / ``--retrieval`` folders in the layout of ``tools/make_demo_data.py`` (without
  ``--dataset``, by default the run's ``eval`` folders) -> metrics printed and, with ``--json``,
  written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
import yaml

from llip_scale.checkpoints.store import ResumeError, export, find_checkpoint
from llip_scale.eval import suite
from llip_scale.eval.datasets import parse_spec
from llip_scale.eval.run import evaluate
from llip_scale.eval.suite import load_benchmarks
from llip_scale.interop.factory import get_tokenizer
from llip_scale.interop.pretrained import load_pretrained


def load_for_eval(path: Path, device: torch.device, backend: str) -> tuple[torch.nn.Module, dict]:
    """The model at ``path`` and the config saved with it (only ``model`` for an export)."""

    if (path / "model.safetensors").is_file() or path.suffix == ".safetensors":
        folder = path if path.is_dir() else path.parent
        return load_pretrained(path, device, backend), yaml.safe_load((folder / "config.yaml").read_text())
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path} holds no complete checkpoint and no model.safetensors; pass a run "
                                "folder, a checkpoints/step_* folder or an exported folder")
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        export(ckpt, tmp)
        return load_pretrained(tmp, device, backend), config


def resolve_tokenizer(args: argparse.Namespace, model) -> object:
    """``--tokenizer`` / ``--bpe-vocab`` when given, else the model's own: the export's, the run's
    ``data.tokenizer``, or CLIP BPE for a CLIP-vocabulary model (see ``llip_scale.get_tokenizer``)."""

    chosen = args.tokenizer or args.bpe_vocab
    if chosen and not Path(chosen).is_file():
        raise FileNotFoundError(f"tokenizer file {chosen} does not exist; fix the path")
    return get_tokenizer(chosen or args.path, model.cfg.text.context_length)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llip-eval", description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="run folder, checkpoint folder, export or imported official model")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=ROOT",
                   help="benchmark set in its native layout (repeatable): imagenet1k, imagenet-v2, imagenet-r, "
                        "imagenet-a, imagenet-sketch, cifar10, cifar100, coco, flickr30k, wds")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece model or CLIP BPE merges (default: the export's, the run's data.tokenizer, "
                        "or CLIP BPE for a CLIP-vocabulary model)")
    p.add_argument("--bpe-vocab", default=None, help="CLIP BPE merges file (bpe_simple_vocab_16e6.txt.gz)")
    p.add_argument("--zeroshot", default=None, help="zero-shot folder (default: the run's eval.zeroshot_dir)")
    p.add_argument("--retrieval", default=None, help="retrieval folder (default: the run's eval.retrieval_dir)")
    p.add_argument("--taus", type=float, nargs="*", default=None, help="also evaluate zero-shot at these taus")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: sized from the free memory for --dataset, 64 otherwise)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="pair backend: auto, chunked, triton, reference")
    p.add_argument("--json", default=None, help="also write the metrics (with --dataset: the report) to this file")
    p.add_argument("--markdown", default=None, help="with --dataset: also write the table to this file")
    return p.parse_args(argv)


def run_benchmarks(args: argparse.Namespace, benches: list, model, tokenizer, device: torch.device,
                   extra: dict) -> str:
    """The suite over ``benches``; the report is written after every set. Returns the table."""

    batch = args.batch_size or suite.auto_batch_size(model.cfg, device, args.workers)
    report = {"model": suite.describe_model(model, str(args.path)), "protocol": suite.protocol(model, device),
              "batch_size": batch, "results": [], **extra}

    def save(rows: list[dict]) -> None:
        report["results"] = rows
        suite.write_report(report, args.json, args.markdown)

    suite.run_suite(model, tokenizer, benches, model.cfg.vision.image_size, device, batch, args.workers,
                    on_row=save)
    return suite.to_markdown(report)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)

    try:
        benches = load_benchmarks([parse_spec(s) for s in args.dataset])  # fail before loading the model
        device = torch.device(args.device)
        model, config = load_for_eval(args.path, device, args.backend)
        ev = {} if benches else config.get("eval") or {}  # the run's own eval folders only when nothing else is asked
        zs, rt = args.zeroshot or ev.get("zeroshot_dir", ""), args.retrieval or ev.get("retrieval_dir", "")
        if not (benches or zs or rt):
            raise ValueError("say what to evaluate: --dataset NAME=ROOT and/or --zeroshot DIR / --retrieval DIR")
        tokenizer = resolve_tokenizer(args, model)
        metrics = {}
        if zs or rt:
            metrics = evaluate(model, tokenizer, model.cfg.vision.image_size, device, zeroshot_dir=zs,
                               retrieval_dir=rt, batch_size=args.batch_size or 64, taus=args.taus)
            for key, value in metrics.items():
                print(f"{key:40s} {value:.4f}")
        if benches:
            print(run_benchmarks(args, benches, model, tokenizer, device, {"folders": metrics} if metrics else {}))
        elif args.json:
            Path(args.json).write_text(json.dumps(metrics, indent=1))
    except (FileNotFoundError, ValueError, ResumeError) as e:  # ConfigError, DatasetError: ValueErrors
        print(f"llip-eval: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
