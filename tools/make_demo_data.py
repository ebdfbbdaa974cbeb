#!/usr/bin/env python
"""Generate the demo data set: procedural scenes, several captions per image, a tokenizer and a
held-out evaluation split. Deterministic: the same arguments give byte-identical files.

    python tools/make_demo_data.py data/demo [--train 16000] [--seed 0]

Output layout::

    OUT_DIR/train/shard-000000.tar ...   img2dataset layout, --per-shard samples per shard:
                                         KEY.jpg (64 px), KEY.txt (first caption),
                                         KEY.json {"captions": [...], "objects": [...]}
    OUT_DIR/tokenizer.model              sentencepiece (pad 0, unk 1, eos/EOT 2), trained on the
                                         train captions and the zero-shot prompts by the code of
                                         tools/train_tokenizer.py; vocabulary <= --vocab-size
    OUT_DIR/eval/                        held-out split (scenes drawn from another seed stream):
      classnames.txt                     zero-shot class names, line i = class i ("red circle");
                                         every colour x shape pair
      templates.txt                      prompt templates, one per line, "{}" = class name
      zeroshot.jsonl                     one line per image: {"image": "images/zs-000000.jpg",
                                         "label": i}; each image holds exactly one object, of
                                         class i, at a random size and place
      retrieval.jsonl                    one line per image: {"image": "images/rt-000000.jpg",
                                         "captions": [5 captions]} (COCO style: caption c of
                                         image i matches image i only); scenes like the train set
      images/                            the JPEG files named above, paths relative to eval/

Point training at it with ``data.shards=OUT_DIR/train/shard-{000000..NNNNNN}.tar`` (printed at
the end) and ``data.tokenizer=OUT_DIR/tokenizer.model``; both eval folders are ``OUT_DIR/eval``.
``llip_scale.eval.evalsets.load_zeroshot_split`` and ``load_retrieval_split`` read the eval folder.

Each caption describes a different object (shape, colour, size, position) or a relation between
two objects (left of, above, larger than), or lists the whole scene: the caption diversity that
Llip's per-caption mixture of visual tokens is built to model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llip_scale.data import scenes
from llip_scale.data.tokenizer import train_tokenizer
from llip_scale.data.writer import ShardWriter, sample_files

SPLIT_TRAIN, SPLIT_ZEROSHOT, SPLIT_RETRIEVAL = 0, 1, 2
RETRIEVAL_CAPTIONS = 5


def _rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


def write_train(out: Path, n: int, per_shard: int, seed: int, size: int) -> tuple[str, list[str]]:
    """Train shards; returns their brace spec and every caption (for the tokenizer)."""
    all_captions: list[str] = []
    with ShardWriter(out, per_shard) as writer:
        for i in range(n):
            rng = _rng(seed, SPLIT_TRAIN, i)
            scene = scenes.random_scene(rng)
            caps = scenes.scene_captions(scene, rng)
            meta = {"objects": [{"shape": o.shape, "color": o.color, "size": o.size,
                                 "cell": o.cell} for o in scene.objects]}
            writer.write(f"{i:09d}", sample_files(scenes.encode_jpeg(scenes.render(scene, size)),
                                                  "jpg", caps, meta))
            all_captions.extend(caps)
    return writer.spec(), all_captions


def write_eval(out: Path, n_zeroshot: int, n_retrieval: int, seed: int, size: int) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    classes = scenes.class_names()
    (out / "classnames.txt").write_text("\n".join(classes) + "\n")
    (out / "templates.txt").write_text("\n".join(scenes.TEMPLATES) + "\n")
    zs = []
    for i in range(n_zeroshot):
        rng = _rng(seed, SPLIT_ZEROSHOT, i)
        label = i % len(classes)  # balanced classes
        color, shape = classes[label].split(" ")
        obj = scenes.random_object(rng, int(rng.integers(9)), shape=shape, color=color)
        scene = scenes.Scene((obj,), scenes.BACKGROUNDS[int(rng.integers(len(scenes.BACKGROUNDS)))])
        name = f"images/zs-{i:06d}.jpg"
        (out / name).write_bytes(scenes.encode_jpeg(scenes.render(scene, size)))
        zs.append(json.dumps({"image": name, "label": label}))
    (out / "zeroshot.jsonl").write_text("".join(line + "\n" for line in zs))
    rt = []
    for i in range(n_retrieval):
        rng = _rng(seed, SPLIT_RETRIEVAL, i)
        scene = scenes.random_scene(rng)
        caps = scenes.scene_captions(scene, rng, relations=3)
        caps = [caps[k] for k in sorted(rng.permutation(len(caps))[:RETRIEVAL_CAPTIONS])]
        name = f"images/rt-{i:06d}.jpg"
        (out / name).write_bytes(scenes.encode_jpeg(scenes.render(scene, size)))
        rt.append(json.dumps({"image": name, "captions": caps}))
    (out / "retrieval.jsonl").write_text("".join(line + "\n" for line in rt))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--train", type=int, default=16000, help="train samples (default 16000)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per train shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--eval-zeroshot", type=int, default=640, help="zero-shot images (10 per class)")
    p.add_argument("--eval-retrieval", type=int, default=500, help="retrieval images")
    p.add_argument("--vocab-size", type=int, default=1024, help="upper bound of the vocabulary")
    args = p.parse_args(argv)
    if min(args.train, args.per_shard, args.image_size, args.vocab_size) < 1 or \
            min(args.eval_zeroshot, args.eval_retrieval) < 0 or args.seed < 0:
        p.error("sizes must be >= 1, eval counts and --seed >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec, captions = write_train(args.out_dir / "train", args.train, args.per_shard, args.seed,
                                 args.image_size)
    prompts = [t.format(c) for c in scenes.class_names() for t in scenes.TEMPLATES]
    tok = train_tokenizer(captions + prompts, str(args.out_dir / "tokenizer.model"), args.vocab_size)
    write_eval(args.out_dir / "eval", args.eval_zeroshot, args.eval_retrieval, args.seed,
               args.image_size)
    print(f"train: {args.train} samples in {spec}")
    print(f"tokenizer: {args.out_dir / 'tokenizer.model'} (vocab {tok.vocab_size})")
    print(f"eval: {args.out_dir / 'eval'} ({args.eval_zeroshot} zero-shot images, "
          f"{len(scenes.class_names())} classes; {args.eval_retrieval} retrieval images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
