#!/usr/bin/env python
"""Consolidate a training checkpoint into one safetensors file plus its model config.

    python tools/export_checkpoint.py RUN/checkpoints/step_0000010000 OUT_DIR
    python tools/export_checkpoint.py RUN OUT_DIR          # the newest complete checkpoint of RUN

Works for every ZeRO stage (ZeRO-3 shards are gathered into full fp32 tensors, offline, in one
process). OUT_DIR gets ``model.safetensors``, ``config.yaml`` (the model config) and
``inference.yaml`` with the tokenizer (the run's sentencepiece model is copied in as
``tokenizer.model``; ``--tokenizer FILE`` names another) and the image preprocessing, so the
folder alone is enough for inference::

    model, _, preprocess = llip_scale.create_model_and_transforms(OUT_DIR)
    tokenizer = llip_scale.get_tokenizer(OUT_DIR)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def pick_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint folder, else the newest complete one of a run folder."""
    from llip_scale.checkpoints.store import MARKER, list_checkpoints

    if (path / MARKER).is_file() or path.name.startswith("step_"):
        return path
    complete = [f.path for f in list_checkpoints(path) if (f.path / MARKER).is_file()]
    if not complete:
        raise FileNotFoundError(f"{path} holds no complete checkpoint; pass RUN or RUN/checkpoints/step_XXXXXXXXXX")
    return complete[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("out_dir", type=Path, help="where to write model.safetensors, config.yaml and inference.yaml")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer to bundle: a sentencepiece .model or CLIP BPE merges (default: the run's)")
    args = p.parse_args(argv)
    from llip_scale.checkpoints.store import ResumeError, export
    from llip_scale.errors import ConfigError
    from llip_scale.interop.factory import bundle_spec, resolve, write_inference_file

    try:
        checkpoint = pick_checkpoint(args.checkpoint)
        source = resolve(checkpoint)
        bundle_spec(source, args.tokenizer)  # a missing tokenizer fails before anything is written
        weights = export(checkpoint, args.out_dir)
        write_inference_file(args.out_dir, source, args.tokenizer)
    except (FileNotFoundError, ResumeError, ConfigError) as e:
        print(f"export_checkpoint: {e}", file=sys.stderr)
        return 1
    print(f"exported {checkpoint} -> {weights} (+ config.yaml, inference.yaml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
