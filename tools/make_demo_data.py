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

Options for an experiment where the captions of an image differ (``tools/reproduce_small.py``)::

    --objects MIN MAX --relations N      objects per scene, relation captions per image
    --no-scene-caption                   drop the caption that lists the whole scene, so every
                                         caption names one object or one relation
    --heldout N                          OUT_DIR/heldout/shard-*.tar: N held-out pairs drawn like
                                         the train set (for eval.heldout_shards)
    --compositional N                    three more evaluation folders in OUT_DIR/eval:
      colour/, shape/                    zero-shot over the 8 colours alone and the 8 shapes alone,
                                         on the zero-shot images; a colour's prompts name it with
                                         every shape ("a red {shape}."), a shape's with every
                                         colour, so each prompt reads like a training caption
      objects/retrieval.jsonl            N scenes like the train set; their captions are one per
                                         object, naming size, colour, shape and place ("a small red
                                         circle on the left."), and no two objects of the split
                                         share all four: text->image is single-object retrieval
                                         with one right image, image->text counts a hit when any
                                         of the image's (all correct) captions is in the top k

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llip_scale.data import scenes
from llip_scale.data.tokenizer import train_tokenizer
from llip_scale.data.writer import ShardWriter, sample_files

SPLIT_TRAIN, SPLIT_ZEROSHOT, SPLIT_RETRIEVAL, SPLIT_HELDOUT, SPLIT_OBJECTS = 0, 1, 2, 3, 4
RETRIEVAL_CAPTIONS = 5
# size x colour x shape x cell: the objects that --compositional's captions tell apart
DISTINCT_OBJECTS = len(scenes.SIZES) * len(scenes.COLORS) * len(scenes.SHAPES) * 9


def _rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


@dataclass(frozen=True)
class SceneOptions:
    """How train (and held-out) scenes and their captions are drawn."""
    min_objects: int = 2
    max_objects: int = 4
    relations: int = 2
    whole_scene: bool = True


def write_train(out: Path, n: int, per_shard: int, seed: int, size: int, opts: SceneOptions = SceneOptions(),
                split: int = SPLIT_TRAIN) -> tuple[str, list[str]]:
    """Train (or held-out) shards; returns their brace spec and every caption (for the tokenizer)."""
    all_captions: list[str] = []
    with ShardWriter(out, per_shard) as writer:
        for i in range(n):
            rng = _rng(seed, split, i)
            scene = scenes.random_scene(rng, opts.min_objects, opts.max_objects)
            caps = scenes.scene_captions(scene, rng, opts.relations, opts.whole_scene)
            meta = {"objects": [{"shape": o.shape, "color": o.color, "size": o.size,
                                 "cell": o.cell} for o in scene.objects]}
            writer.write(f"{i:09d}", sample_files(scenes.encode_jpeg(scenes.render(scene, size)),
                                                  "jpg", caps, meta))
            all_captions.extend(caps)
    return writer.spec(), all_captions


def write_eval(out: Path, n_zeroshot: int, n_retrieval: int, seed: int, size: int,
               opts: SceneOptions = SceneOptions()) -> None:
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
        scene = scenes.random_scene(rng, opts.min_objects, opts.max_objects)
        caps = scenes.scene_captions(scene, rng, relations=3, whole_scene=opts.whole_scene)
        caps = [caps[k] for k in sorted(rng.permutation(len(caps))[:RETRIEVAL_CAPTIONS])]
        name = f"images/rt-{i:06d}.jpg"
        (out / name).write_bytes(scenes.encode_jpeg(scenes.render(scene, size)))
        rt.append(json.dumps({"image": name, "captions": caps}))
    (out / "retrieval.jsonl").write_text("".join(line + "\n" for line in rt))


def _unique_scene(rng: np.random.Generator, used: set, opts: SceneOptions) -> scenes.Scene:
    """A scene none of whose objects has the (size, colour, shape, cell) of an object in ``used``."""
    n = int(rng.integers(opts.min_objects, opts.max_objects + 1))
    objects = []
    for cell in rng.choice(9, size=n, replace=False):
        for _ in range(1000):
            obj = scenes.random_object(rng, int(cell))
            if (obj.size, obj.color, obj.shape, obj.cell) not in used:
                break
        else:
            raise SystemExit(f"make_demo_data: no distinct object left for cell {cell} of --compositional scene; "
                             "lower --compositional")
        used.add((obj.size, obj.color, obj.shape, obj.cell))
        objects.append(obj)
    return scenes.Scene(tuple(objects), scenes.BACKGROUNDS[int(rng.integers(len(scenes.BACKGROUNDS)))])


def write_compositional(out: Path, n_objects: int, seed: int, size: int, opts: SceneOptions) -> None:
    """eval/colour and eval/shape (zero-shot by one attribute, on the zero-shot images) and
    eval/objects (single-object captions, unique in the split)."""
    classes = scenes.class_names()
    records = [json.loads(line) for line in (out / "zeroshot.jsonl").read_text().splitlines()]
    attributes = {"colour": (list(scenes.COLORS), [f"a {{}} {s}." for s in scenes.SHAPES], 0),
                  "shape": (list(scenes.SHAPES), [f"a {c} {{}}." for c in scenes.COLORS], 1)}
    for name, (names, templates, part) in attributes.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "classnames.txt").write_text("\n".join(names) + "\n")
        (folder / "templates.txt").write_text("\n".join(templates) + "\n")
        lines = [json.dumps({"image": f"../{r['image']}", "label": names.index(classes[r["label"]].split(" ")[part])})
                 for r in records]
        (folder / "zeroshot.jsonl").write_text("".join(line + "\n" for line in lines))
    folder = out / "objects"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    used: set = set()
    rt = []
    for i in range(n_objects):
        rng = _rng(seed, SPLIT_OBJECTS, i)
        scene = _unique_scene(rng, used, opts)
        name = f"images/ob-{i:06d}.jpg"
        (folder / name).write_bytes(scenes.encode_jpeg(scenes.render(scene, size)))
        rt.append(json.dumps({"image": name, "captions": [scenes.located_caption(o) for o in scene.objects]}))
    (folder / "retrieval.jsonl").write_text("".join(line + "\n" for line in rt))


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
    p.add_argument("--objects", type=int, nargs=2, default=[2, 4], metavar=("MIN", "MAX"),
                   help="objects per scene (default 2 4; at most 9)")
    p.add_argument("--relations", type=int, default=2, help="relation captions per train image (default 2)")
    p.add_argument("--no-scene-caption", dest="scene_caption", action="store_false",
                   help="no caption lists the whole scene: each names one object or one relation")
    p.add_argument("--heldout", type=int, default=0, help="held-out pairs drawn like the train set (default 0)")
    p.add_argument("--compositional", type=int, default=0, metavar="N",
                   help="write eval/colour, eval/shape and eval/objects (N scenes) (default 0: none)")
    args = p.parse_args(argv)
    if not 1 <= args.objects[0] <= args.objects[1] <= 9 or args.relations < 0 or min(args.heldout, args.compositional) < 0:
        p.error("--objects needs 1 <= MIN <= MAX <= 9; --relations, --heldout and --compositional must be >= 0")
    if args.compositional * args.objects[0] > DISTINCT_OBJECTS // 2:
        p.error(f"--compositional {args.compositional} with at least {args.objects[0]} objects per scene needs more "
                f"than half of the {DISTINCT_OBJECTS} distinct objects; lower it to at most "
                f"{DISTINCT_OBJECTS // 2 // args.objects[0]}")
    if min(args.train, args.per_shard, args.image_size, args.vocab_size) < 1 or \
            min(args.eval_zeroshot, args.eval_retrieval) < 0 or args.seed < 0:
        p.error("sizes must be >= 1, eval counts and --seed >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = SceneOptions(args.objects[0], args.objects[1], args.relations, args.scene_caption)
    spec, captions = write_train(args.out_dir / "train", args.train, args.per_shard, args.seed,
                                 args.image_size, opts)
    prompts = [t.format(c) for c in scenes.class_names() for t in scenes.TEMPLATES]
    tok = train_tokenizer(captions + prompts, str(args.out_dir / "tokenizer.model"), args.vocab_size)
    write_eval(args.out_dir / "eval", args.eval_zeroshot, args.eval_retrieval, args.seed,
               args.image_size, opts)
    if args.heldout:
        held, _ = write_train(args.out_dir / "heldout", args.heldout, args.per_shard, args.seed, args.image_size,
                              opts, SPLIT_HELDOUT)
        print(f"heldout: {args.heldout} samples in {held}")
    if args.compositional:
        write_compositional(args.out_dir / "eval", args.compositional, args.seed, args.image_size, opts)
        print(f"compositional: {args.out_dir / 'eval'}/colour, shape, objects ({args.compositional} scenes)")
    print(f"train: {args.train} samples in {spec}")
    print(f"tokenizer: {args.out_dir / 'tokenizer.model'} (vocab {tok.vocab_size})")
    print(f"eval: {args.out_dir / 'eval'} ({args.eval_zeroshot} zero-shot images, "
          f"{len(scenes.class_names())} classes; {args.eval_retrieval} retrieval images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
