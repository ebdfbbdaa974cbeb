"""Readers for evaluation folders (the layout ``tools/make_demo_data.py`` writes).

Layout of an evaluation folder::

    classnames.txt    zero-shot class names, line i = class i        (zero-shot)
    templates.txt     prompt templates, one per line, "{}" = class    (zero-shot)
    zeroshot.jsonl    {"image": "images/zs-000000.jpg", "label": 17}  (zero-shot)
    retrieval.jsonl   {"image": "images/rt-000000.jpg", "captions": ["...", ...]}  (retrieval)
    images/           the files named above (paths are relative to the folder)

Flow: folder -> :func:`load_zeroshot_split` / :func:`load_retrieval_split` (checked, one clear
error line per problem) -> :class:`EvalImages` (a map-style torch Dataset: resize the short
side, center crop, OpenAI normalisation) -> a DataLoader in the evaluation code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from llip_scale.data.transforms import eval_image
from llip_scale.errors import ConfigError


def _error(message: str) -> Exception:
    return ConfigError(message)


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise _error(f"evaluation file {path} is missing; regenerate the folder with "
                     f"tools/make_demo_data.py or point the eval config at another folder")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _records(path: Path, fields: Sequence[str]) -> list[dict]:
    out = []
    for n, line in enumerate(_lines(path), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error(f"{path}:{n}: not valid JSON ({e.msg})") from None
        missing = [f for f in fields if f not in rec]
        if missing:
            raise _error(f"{path}:{n}: record lacks {', '.join(missing)}")
        out.append(rec)
    return out


@dataclass
class ZeroShotSplit:
    images: list[Path]
    labels: list[int]
    classnames: list[str]
    templates: list[str]


@dataclass
class RetrievalSplit:
    images: list[Path]
    captions: list[list[str]]  # several per image; caption c of image i belongs to image i


def load_zeroshot_split(root: str | Path) -> ZeroShotSplit:
    root = Path(root)
    classnames, templates = _lines(root / "classnames.txt"), _lines(root / "templates.txt")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise _error(f"{root / 'templates.txt'}: template '{bad[0]}' has no '{{}}' for the class name")
    recs = _records(root / "zeroshot.jsonl", ("image", "label"))
    labels = [int(r["label"]) for r in recs]
    if any(not 0 <= y < len(classnames) for y in labels):
        raise _error(f"{root / 'zeroshot.jsonl'}: a label is outside 0..{len(classnames) - 1}")
    return ZeroShotSplit([root / r["image"] for r in recs], labels, classnames, templates)


def load_retrieval_split(root: str | Path) -> RetrievalSplit:
    root = Path(root)
    recs = _records(root / "retrieval.jsonl", ("image", "captions"))
    return RetrievalSplit([root / r["image"] for r in recs], [list(r["captions"]) for r in recs])


class EvalImages(Dataset):
    """Images by path -> float32 ``[3, size, size]`` (resize short side, center crop)."""

    def __init__(self, paths: Sequence[Path], image_size: int):
        self.paths, self.image_size = list(paths), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return eval_image(Path(self.paths[i]).read_bytes(), self.image_size)
