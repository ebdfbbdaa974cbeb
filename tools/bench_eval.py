#!/usr/bin/env python
"""Evaluation throughput: zero-shot over the 1000 ImageNet classes, images/s, and what dominates.

    python tools/bench_eval.py --models tiny b16 --images 64 --batch-size 32 --json benchmarks/eval_cpu.json

Writes a synthetic ImageNet validation folder (``ROOT/val/<wnid>/*.JPEG``: all 1000 wnid folders,
``--images`` JPEGs of ``--image-px`` spread over them), builds each model with random weights
(throughput does not depend on the weights) and runs the same code as ``llip-eval --dataset
imagenet1k=ROOT``: DataLoader workers decode, the vision tower encodes, every image is mixed for
each of the 1000 class queries through the pair backend. Prints and writes, per model: images/s of
the whole image pass (decode in the workers, vision tower, per-class mixing), the share of
that time spent in the vision tower, in the mixing and waiting for decoded images, and the
one-time cost of encoding the class prompts (``--templates`` of
the 80, since it does not depend on the number of images). Prompts are tokenised by a byte hash
(no tokenizer file needed; text cost depends only on the context length).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llip_scale.eval import suite  # noqa: E402
from llip_scale.eval.datasets import asset_lines, load_benchmark  # noqa: E402
from llip_scale.model import build_model, model_config  # noqa: E402


def write_imagenet(root: Path, images: int, px: tuple[int, int], seed: int = 0) -> Path:
    """All 1000 class folders (empty ones still count as classes), ``images`` smooth random JPEGs."""
    rng = np.random.default_rng(seed)
    wnids = asset_lines("imagenet_wnids.txt")
    for w in wnids:
        (root / "val" / w).mkdir(parents=True, exist_ok=True)
    w, h = px
    for i in range(images):
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)  # upsampled: JPEG-like content
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(
            root / "val" / wnids[i % len(wnids)] / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)
    return root


def hash_tokenize(context_length: int, vocab_size: int, eot: int):
    def tokenize(texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [3 + b % (vocab_size - 3) for b in t.encode()][:context_length - 1] + [eot]
            out[i, :len(ids)] = torch.tensor(ids)
        return out
    return tokenize


def bench_model(name: str, root: Path, batch_size: int, workers: int, templates: int, backend: str) -> dict:
    torch.manual_seed(0)
    cfg = model_config(name)
    model = build_model(cfg, backend=backend).eval()
    bench = load_benchmark("imagenet1k", root)
    bench.templates = bench.templates[:templates]
    tokenize = hash_tokenize(cfg.text.context_length, cfg.text.vocab_size, cfg.text.eot_id)
    row = suite.evaluate_benchmark(model, tokenize, bench, cfg.vision.image_size, torch.device("cpu"), batch_size,
                                   workers, stream=sys.stderr)
    s, n = row["seconds"], row["images"]
    wall = s["images_wall"]
    return {
        "model": name, "image_size": cfg.vision.image_size, "num_tokens": cfg.vision.num_tokens,
        "embed_dim": cfg.head.embed_dim, "num_heads": cfg.head.num_heads, "images": n, "classes": row["classes"],
        "templates": templates, "batch_size": batch_size, "workers": workers, "pair_backend": backend,
        "images_per_s": round(n / wall, 3),
        "vision_images_per_s": round(n / s["vision"], 3),
        "mixing_images_per_s": round(n / max(s["scores"], 1e-9), 3),
        "seconds": s,
        "vision_share": round(s["vision"] / wall, 4),
        "mixing_share": round(s["scores"] / wall, 4),
        "decode_wait_share": round(max(wall - s["vision"] - s["scores"], 0.0) / wall, 4),
        "class_prompts_s": round(s["classes"], 3),
    }


def table(rows: list[dict]) -> str:
    lines = ["| model | px | K | batch | images | classes | images/s | vision tower | per-class mixing "
             "| waiting for decode | vision alone, images/s | mixing alone, images/s | class prompts (one-time) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['image_size']} | {r['num_tokens']} | {r['batch_size']} | {r['images']} "
                     f"| {r['classes']} | {r['images_per_s']:.2f} | {100 * r['vision_share']:.1f}% "
                     f"| {100 * r['mixing_share']:.1f}% | {100 * r['decode_wait_share']:.1f}% "
                     f"| {r['vision_images_per_s']:.2f} | {r['mixing_images_per_s']:.1f} "
                     f"| {r['classes'] * r['templates']} in {r['class_prompts_s']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "b16"])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-px", type=int, nargs=2, default=[500, 375], help="width height of the JPEGs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--templates", type=int, default=1, help="prompt templates per class (of the 80)")
    p.add_argument("--backend", default="chunked", help="pair backend")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = write_imagenet(Path(tmp), args.images, tuple(args.image_px))
        print(f"wrote {args.images} JPEGs in 1000 class folders in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        rows = [bench_model(m, root, args.batch_size, args.workers, args.templates, args.backend) for m in args.models]
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "cpu": platform.processor() or platform.machine(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(table(rows))
    print(f"environment: {env}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
