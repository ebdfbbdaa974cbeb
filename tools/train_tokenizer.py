#!/usr/bin/env python
"""Train a sentencepiece tokenizer on caption files.

    python tools/train_tokenizer.py captions.txt more.jsonl "shards/shard-{000000..000099}.tar" \\
        --out tokenizer.model --vocab-size 32000

Inputs, by extension: ``.txt`` one caption per line; ``.jsonl`` one caption per line as a JSON
string, a list of strings, or a mapping with ``caption``/``captions``/``text``; ``.csv``/``.tsv``
a ``caption`` (or ``--column``) column; ``.tar`` shards (brace patterns allowed) in the
img2dataset layout, every caption of every sample. The model gets pad 0, unk 1, eos 2 (the EOT
token) and no bos, matching the text tower's defaults; see ``llip_scale.data.Tokenizer``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Iterator

from llip_scale.data.samples import SkipSample, captions
from llip_scale.data.shards import expand_braces
from llip_scale.data.tario import TarError, iter_samples
from llip_scale.data.tokenizer import train_tokenizer


def _jsonl(path: Path) -> Iterator[str]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if isinstance(obj, dict):
            obj = obj.get("captions", obj.get("caption", obj.get("text")))
        yield from ([obj] if isinstance(obj, str) else [c for c in obj or [] if isinstance(c, str)])


def _table(path: Path, column: str) -> Iterator[str]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        if column not in (reader.fieldnames or []):
            raise SystemExit(f"train_tokenizer: {path} has no '{column}' column "
                             f"(columns: {', '.join(reader.fieldnames or [])}); pass --column")
        for row in reader:
            yield row[column]


def _shard(path: Path) -> Iterator[str]:
    with path.open("rb") as f:
        try:
            for sample in iter_samples(f):
                try:
                    yield from captions(sample)
                except SkipSample:
                    continue
        except TarError as e:
            print(f"train_tokenizer: {path}: {e}; using the captions before it", file=sys.stderr)


def read_captions(inputs: list[str], column: str = "caption") -> Iterator[str]:
    """Every caption of every input file, in order."""
    for pattern in inputs:
        for name in expand_braces(pattern):
            path = Path(name)
            if not path.is_file():
                raise SystemExit(f"train_tokenizer: input {path} does not exist")
            if path.suffix == ".jsonl":
                yield from _jsonl(path)
            elif path.suffix in (".csv", ".tsv"):
                yield from _table(path, column)
            elif name.endswith((".tar", ".tar.gz", ".tgz")):
                yield from _shard(path)
            else:
                yield from (line for line in path.read_text(encoding="utf-8").splitlines())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="caption files: .txt, .jsonl, .csv/.tsv, .tar shards")
    p.add_argument("--out", required=True, help="model file to write, e.g. tokenizer.model")
    p.add_argument("--vocab-size", type=int, default=32000, help="upper bound of the vocabulary")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--case-sensitive", action="store_true", help="keep case (default: case-fold)")
    p.add_argument("--column", default="caption", help="caption column of .csv/.tsv inputs")
    p.add_argument("--max-captions", type=int, default=0, help="use at most this many (0: all)")
    args = p.parse_args(argv)
    texts = [t for t in (" ".join(c.split()) for c in read_captions(args.inputs, args.column)) if t]
    if args.max_captions:
        texts = texts[: args.max_captions]
    if not texts:
        raise SystemExit("train_tokenizer: the inputs hold no captions")
    tok = train_tokenizer(texts, args.out, args.vocab_size, args.model_type, args.case_sensitive)
    print(f"wrote {args.out}: vocab {tok.vocab_size}, trained on {len(texts)} captions "
          f"(pad {tok.pad_id}, eot {tok.eot_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
