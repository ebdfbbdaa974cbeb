#!/usr/bin/env python
"""Picture of Llip's caption-specific mixing: for one image and several captions, each caption's
mixing weights over the K mixture tokens (per head) and its score, as a PNG.

    python tools/visualize_mixing.py RUN_OR_CHECKPOINT_OR_EXPORT image.jpg \
        "a red circle" "a blue square left of a green star" --out mixing.png [--tokenizer tok.model]

The tokenizer is the one the model folder carries (see ``llip_scale.get_tokenizer``) unless
``--tokenizer`` names one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llip_scale.data import eval_image
from llip_scale.eval.cli import load_for_eval
from llip_scale.eval.mixing import caption_mixing, plot_mixing
from llip_scale.interop.factory import get_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="run folder, checkpoint folder or exported folder")
    p.add_argument("image", type=Path)
    p.add_argument("captions", nargs="+")
    p.add_argument("--out", type=Path, default=Path("mixing.png"))
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece model or CLIP BPE merges (default: the model folder's own tokenizer)")
    args = p.parse_args(argv)
    try:
        model, _ = load_for_eval(args.model, torch.device("cpu"), "auto")
        if not model.is_llip:
            raise ValueError(f"the model's head is '{model.cfg.head.kind}': only Llip mixes tokens per caption")
        tokens = get_tokenizer(args.tokenizer or args.model, model.cfg.text.context_length)(args.captions)
        raw = args.image.read_bytes()
    except (OSError, ValueError) as e:
        print(f"visualize_mixing: {e}", file=sys.stderr)
        return 2
    weights, scores = caption_mixing(model, eval_image(raw, model.cfg.vision.image_size), tokens)
    picture = np.asarray(Image.open(args.image).convert("RGB"))
    fig = plot_mixing(weights, args.captions, scores.tolist(), image=picture, title=str(args.model))
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"wrote {args.out}: {len(args.captions)} captions x {weights.shape[1]} heads x {weights.shape[2]} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
