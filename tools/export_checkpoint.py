#!/usr/bin/env python
"""Consolidate a training checkpoint into one safetensors file plus its model config.

    python tools/export_checkpoint.py RUN/checkpoints/step_0000010000 OUT_DIR
    python tools/export_checkpoint.py RUN OUT_DIR          # the newest complete checkpoint of RUN

Works for every ZeRO stage (ZeRO-3 shards are gathered into full fp32 tensors, offline, in one
process). OUT_DIR gets ``model.safetensors`` and ``config.yaml``; load them for inference with
``llip_scale.load_pretrained(OUT_DIR)``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def pick_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint folder, else the newest complete one of a run folder."""
    from llip_scale.checkpoint import MARKER, list_checkpoints

    if (path / MARKER).is_file() or path.name.startswith("step_"):
        return path
    complete = [f.path for f in list_checkpoints(path) if (f.path / MARKER).is_file()]
    if not complete:
        raise FileNotFoundError(f"{path} holds no complete checkpoint; pass RUN or RUN/checkpoints/step_XXXXXXXXXX")
    return complete[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("out_dir", type=Path, help="where to write model.safetensors and config.yaml")
    args = p.parse_args(argv)
    from llip_scale.checkpoint import ResumeError, export

    try:
        checkpoint = pick_checkpoint(args.checkpoint)
        weights = export(checkpoint, args.out_dir)
    except (FileNotFoundError, ResumeError) as e:
        print(f"export_checkpoint: {e}", file=sys.stderr)
        return 1
    print(f"exported {checkpoint} -> {weights} (+ config.yaml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
