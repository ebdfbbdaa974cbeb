#!/usr/bin/env python
"""Loader throughput: this pipeline next to a plain webdataset pipeline doing the same work.

    python tools/bench_loader.py --workers 1 2 --json benchmarks/loader_cpu.json

Two shard sets are generated into a temporary folder (or ``--data DIR``, reused when present):
``demo`` (the demo set: 64 px JPEG scenes, several captions, batches at 64 px) and ``jpeg224``
(224 px JPEG scenes with texture noise, batches at 224 px). Both pipelines run the same
per-sample work with the same functions: read the tar stream, shuffle (buffer 1000), pick a
caption, PIL decode, RandomResizedCrop (bicubic), then per batch stack, normalise and tokenize;
both use a torch DataLoader with the same number of workers. The plain pipeline is
``wds.WebDataset(urls, resampled=True).shuffle(1000).map(...).batched(...)`` in a
``wds.WebLoader``; it has no exact resume. Runs alternate between the pipelines and the median
over ``--repeats`` is reported as samples/s, in total and per worker.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from llip_scale.data import DataConfig, Tokenizer, build_train_loader, scenes
from llip_scale.data import samples as sample_parsing
from llip_scale.data.shards import expand_braces
from llip_scale.data.tokenizer import train_tokenizer
from llip_scale.data.transforms import decode_image, normalize, train_crop
from llip_scale.data.writer import ShardWriter, sample_files

BATCH = 64
SHUFFLE = 1000


def make_set(out: Path, n: int, size: int, noise: float, per_shard: int = 500) -> tuple[str, list[str]]:
    """Shards of ``n`` procedural scenes rendered at ``size`` px; returns (spec, captions)."""
    caps_all: list[str] = []
    with ShardWriter(out, per_shard) as w:
        for i in range(n):
            rng = np.random.default_rng([7, size, i])
            scene = scenes.random_scene(rng)
            img = scenes.render(scene, size)
            if noise:  # texture, so a 224 px JPEG costs what a photo of that size costs to decode
                arr = np.asarray(img, dtype=np.int16) + rng.normal(0, noise, (size, size, 3))
                img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
            caps = scenes.scene_captions(scene, rng)
            w.write(f"{i:09d}", sample_files(scenes.encode_jpeg(img, 90), "jpg", caps))
            caps_all += caps
    return w.spec(), caps_all


def ensure_sets(root: Path, n_demo: int, n_224: int) -> tuple[dict[str, tuple[str, int]], Tokenizer]:
    sets = {}
    for name, n, size, noise in (("demo", n_demo, 64, 0.0), ("jpeg224", n_224, 224, 12.0)):
        spec_file = root / name / "SPEC"
        if not spec_file.exists():
            spec, caps = make_set(root / name, n, size, noise)
            spec_file.write_text(spec)
            if name == "demo":
                train_tokenizer(caps, str(root / "tokenizer.model"), 1024)
        sets[name] = (spec_file.read_text(), size)
    return sets, Tokenizer(str(root / "tokenizer.model"), 32)


class _PlainSample:
    """Per-sample work of the plain pipeline; the same functions as the stream uses."""

    def __init__(self, size: int):
        self.size, self.rng = size, None

    def __call__(self, sample: dict) -> tuple[np.ndarray, str]:
        if self.rng is None:  # one generator per worker, seeded by its pid
            self.rng = np.random.default_rng(os.getpid())
        texts = sample_parsing.captions(sample)
        caption = texts[int(self.rng.integers(len(texts)))] if len(texts) > 1 else texts[0]
        img = decode_image(sample_parsing.image_bytes(sample))
        return train_crop(img, self.size, self.rng), caption


class _PlainCollate:
    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def __call__(self, items: list) -> tuple:
        return normalize(np.stack([a for a, _ in items])), self.tok([c for _, c in items])


def plain_loader(spec: str, size: int, tok: Tokenizer, workers: int):
    import webdataset as wds

    ds = (wds.WebDataset(expand_braces(spec), resampled=True, shardshuffle=False,
                         handler=wds.warn_and_continue)
          .shuffle(SHUFFLE).map(_PlainSample(size))
          .batched(BATCH, collation_fn=_PlainCollate(tok), partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers,
                         prefetch_factor=2 if workers else None)


def our_loader(spec: str, size: int, tok: Tokenizer, workers: int):
    cfg = DataConfig(shards=spec, context_length=tok.context_length, workers=workers,
                     shuffle_buffer=SHUFFLE, prefetch=2)
    return build_train_loader(cfg, batch_size=BATCH, rank=0, world_size=1, image_size=size,
                              tokenizer=tok, seed=0)


def measure(loader, batches: int, warmup: int) -> float:
    """Samples/s over ``batches`` batches after ``warmup`` (worker start-up is not counted)."""
    it = iter(loader)
    for _ in itertools.islice(it, warmup):
        pass
    start = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    rate = batches * BATCH / (time.perf_counter() - start)
    del it
    return rate


def run(sets: dict, tok: Tokenizer, workers: list[int], repeats: int, samples: dict) -> list[dict]:
    rows = []
    for (name, (spec, size)), w in itertools.product(sets.items(), workers):
        batches = max(1, samples[name] // BATCH)
        rates: dict[str, list[float]] = {"webdataset": [], "llip_scale": []}
        for _ in range(repeats):  # alternate, so load changes on a shared machine hit both
            rates["webdataset"].append(measure(plain_loader(spec, size, tok, w), batches, 2 * max(w, 1)))
            rates["llip_scale"].append(measure(our_loader(spec, size, tok, w), batches, 2 * max(w, 1)))
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append({"set": name, "image_size": size, "workers": w, "batch": BATCH,
                     "samples": batches * BATCH, "repeats": repeats,
                     "webdataset": med["webdataset"], "llip_scale": med["llip_scale"],
                     "ratio": med["llip_scale"] / med["webdataset"], "all": rates})
        print(f"{name:8s} {size:3d}px workers {w}: webdataset {med['webdataset']:7.0f}/s  "
              f"llip_scale {med['llip_scale']:7.0f}/s  ratio {rows[-1]['ratio']:.2f}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shards | workers | webdataset samples/s (per worker) | llip_scale samples/s "
             "(per worker) | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        w = max(r["workers"], 1)
        lines.append(f"| {r['set']} ({r['image_size']} px) | {r['workers']} | "
                     f"{r['webdataset']:.0f} ({r['webdataset'] / w:.0f}) | "
                     f"{r['llip_scale']:.0f} ({r['llip_scale'] / w:.0f}) | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="folder for the generated shards (default: temporary)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--demo-samples", type=int, default=6400, help="samples timed per run, demo set")
    p.add_argument("--jpeg-samples", type=int, default=1280, help="samples timed per run, 224 px set")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        sets, tok = ensure_sets(root, 4000, 2000)
        rows = run(sets, tok, args.workers, args.repeats,
                   {"demo": args.demo_samples, "jpeg224": args.jpeg_samples})
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                                    f"{platform.python_version()}",
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
