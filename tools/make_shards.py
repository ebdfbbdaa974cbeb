#!/usr/bin/env python
"""Pack images with captions into webdataset tar shards (img2dataset layout).

    python tools/make_shards.py photos/ out/ --per-shard 1000       # a folder
    python tools/make_shards.py pairs.csv out/                        # or a CSV / TSV / JSONL

A folder: every image (jpg, jpeg, png, webp) below it, in path order, with its captions in a
sidecar file of the same name: ``cat.txt`` (one caption per line) and/or ``cat.json``
(``{"captions": [...]}`` or ``{"caption": "..."}``). A CSV/TSV: an image path column (``image``,
``path``, ``filepath``, ``file`` or ``--image-column``) and a caption column (``caption``,
``captions``, ``text`` or ``--caption-column``; a cell starting with ``[`` is a JSON list of
captions); other columns are kept in ``KEY.json``. A JSONL: one object per line with the same
keys. Relative image paths are relative to the CSV/JSONL file.

Each sample becomes ``KEY.jpg|png|webp`` (the original bytes, not re-encoded), ``KEY.txt``
(first caption) and ``KEY.json`` (``{"captions": [...], ...}``), ``KEY`` the 9-digit sample
index; shards are ``OUT/shard-000000.tar`` onwards. The brace spec for ``data.shards`` is
printed at the end.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Iterator

from llip_scale.data.writer import ShardWriter, sample_files

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_COLUMNS = ("image", "path", "filepath", "file")
CAPTION_COLUMNS = ("caption", "captions", "text")

Record = tuple[Path, list[str], dict, str]  # image path, captions, extra metadata, where (for errors)


def _caption_list(value: object) -> list[str]:
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = json.loads(value)
    if isinstance(value, str):
        value = [value]
    return [" ".join(c.split()) for c in value or [] if isinstance(c, str) and c.strip()]


def from_folder(root: Path) -> Iterator[Record]:
    for img in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caps: list[str] = []
        txt, js = img.with_suffix(".txt"), img.with_suffix(".json")
        if txt.is_file():
            caps += txt.read_text(encoding="utf-8").splitlines()
        if js.is_file():
            obj = json.loads(js.read_text(encoding="utf-8"))
            caps += _caption_list(obj.get("captions", obj.get("caption")) if isinstance(obj, dict) else obj)
        yield img, _caption_list(caps), {}, str(img)


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, src: Path) -> str:
    options = [wanted] if wanted else list(defaults)
    for name in options:
        if name in columns:
            return name
    raise SystemExit(f"make_shards: {src} has no {what} column (looked for {', '.join(options)}; "
                     f"columns: {', '.join(columns)}); pass --{what}-column")


def from_rows(src: Path, rows: Iterator[tuple[int, dict]], image_col: str | None,
              caption_col: str | None) -> Iterator[Record]:
    cols: tuple[str, str] | None = None
    for line, row in rows:
        if cols is None:
            cols = (_pick(list(row), image_col, IMAGE_COLUMNS, "image", src),
                    _pick(list(row), caption_col, CAPTION_COLUMNS, "caption", src))
        path = Path(row[cols[0]])
        extra = {k: v for k, v in row.items() if k not in cols}
        yield (path if path.is_absolute() else src.parent / path), _caption_list(row[cols[1]]), \
            extra, f"{src}:{line}"


def _csv_rows(src: Path) -> Iterator[tuple[int, dict]]:
    with src.open(newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.DictReader(f, delimiter="\t" if src.suffix == ".tsv" else ","), 2):
            yield n, row


def _jsonl_rows(src: Path) -> Iterator[tuple[int, dict]]:
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield n, json.loads(line)


def records(src: Path, image_col: str | None, caption_col: str | None) -> Iterator[Record]:
    if src.is_dir():
        return from_folder(src)
    if src.suffix in (".csv", ".tsv"):
        return from_rows(src, _csv_rows(src), image_col, caption_col)
    if src.suffix == ".jsonl":
        return from_rows(src, _jsonl_rows(src), image_col, caption_col)
    raise SystemExit(f"make_shards: {src} is not a folder, .csv, .tsv or .jsonl file")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", type=Path, help="a folder of images with captions, or a CSV/TSV/JSONL")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="shard-", help="shard file name prefix")
    p.add_argument("--image-column", help="image path column of a CSV/JSONL")
    p.add_argument("--caption-column", help="caption column of a CSV/JSONL")
    p.add_argument("--skip-missing", action="store_true",
                   help="skip images that are missing or have no caption instead of stopping")
    args = p.parse_args(argv)
    if not args.input.exists():
        raise SystemExit(f"make_shards: input {args.input} does not exist")
    if args.per_shard < 1:
        raise SystemExit("make_shards: --per-shard must be >= 1")
    skipped = 0
    with ShardWriter(args.out_dir, args.per_shard, args.prefix) as writer:
        for path, caps, extra, where in records(args.input, args.image_column, args.caption_column):
            problem = "image not found" if not path.is_file() else "no caption" if not caps else None
            if problem:
                if not args.skip_missing:
                    raise SystemExit(f"make_shards: {where}: {problem} ({path}); fix the input "
                                     f"or pass --skip-missing")
                skipped += 1
                continue
            files = sample_files(path.read_bytes(), path.suffix.lstrip("."), caps, extra)
            writer.write(f"{writer.count:09d}", files)
    if writer.count == 0:
        raise SystemExit(f"make_shards: {args.input} holds no usable image-caption pairs")
    print(f"wrote {writer.count} samples into {len(writer.paths)} shard(s): {writer.spec()}"
          + (f" ({skipped} skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
