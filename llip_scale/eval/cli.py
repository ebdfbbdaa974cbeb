"""``llip-eval PATH``: zero-shot and retrieval for a training run, checkpoint or exported model.

PATH -> a run folder (its newest complete checkpoint), a ``step_*`` checkpoint folder (any
ZeRO stage: consolidated offline, in one process) or an exported folder -> the model -> the
evaluation folders (from the flags, else the run's ``eval`` config) -> metrics printed and, with
``--json``, written.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
import yaml


def find_checkpoint(path: Path) -> Optional[Path]:
    """A checkpoint folder for ``path``: itself, or a run folder's newest complete checkpoint."""
    from llip_scale.checkpoint import list_checkpoints, problem

    if (path / "complete.json").is_file() or path.name.startswith("step_"):
        return path
    for found in list_checkpoints(path):
        if problem(found.path, contents=False) is None:  # export checks the contents
            return found.path
    return None


def load_for_eval(path: Path, device: torch.device, backend: str) -> tuple[torch.nn.Module, dict]:
    """The model at ``path`` and the config saved with it (only ``model`` for an export)."""
    from llip_scale.checkpoint import export
    from llip_scale.pretrained import load_pretrained

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


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="llip-eval", description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the run's data.tokenizer)")
    p.add_argument("--zeroshot", default=None, help="zero-shot folder (default: the run's eval.zeroshot_dir)")
    p.add_argument("--retrieval", default=None, help="retrieval folder (default: the run's eval.retrieval_dir)")
    p.add_argument("--taus", type=float, nargs="*", default=None, help="also evaluate zero-shot at these taus")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="pair backend: auto, chunked, triton, reference")
    p.add_argument("--json", default=None, help="also write the metrics to this file")
    args = p.parse_args(argv)
    from llip_scale.checkpoint import ResumeError
    from llip_scale.data import Tokenizer
    from llip_scale.eval.run import evaluate

    try:
        device = torch.device(args.device)
        model, config = load_for_eval(args.path, device, args.backend)
        ev, data = config.get("eval", {}), config.get("data", {})
        tok_path = args.tokenizer or data.get("tokenizer")
        zs, rt = args.zeroshot or ev.get("zeroshot_dir", ""), args.retrieval or ev.get("retrieval_dir", "")
        if not tok_path or not (zs or rt):
            raise ValueError("say what to evaluate: --tokenizer FILE and --zeroshot DIR and/or --retrieval DIR")
        tokenizer = Tokenizer(tok_path, model.cfg.text.context_length)
        metrics = evaluate(model, tokenizer, model.cfg.vision.image_size, device, zeroshot_dir=zs,
                           retrieval_dir=rt, batch_size=args.batch_size, taus=args.taus)
    except (FileNotFoundError, ValueError, ResumeError) as e:  # ConfigError is a ValueError; a damaged checkpoint
        print(f"llip-eval: {e}", file=sys.stderr)
        return 2
    for key, value in metrics.items():
        print(f"{key:40s} {value:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
