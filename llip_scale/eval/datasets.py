"""Readers for evaluation sets in the layouts they are distributed in.

NAME, ROOT -> :func:`load_benchmark` -> a checked description of the set, before any model runs:

- :class:`Classification` (class names, prompt templates, one label per image) for
  ``imagenet1k`` (``ROOT/val/<wnid>/*.JPEG``), ``imagenet-v2`` (``ROOT/<0..999 or wnid>/*``),
  ``imagenet-r`` / ``imagenet-a`` (``ROOT/<wnid>/*``, 200-class subsets), ``imagenet-sketch``
  (``ROOT/<wnid>/*``), ``cifar10`` / ``cifar100`` (the python pickles) and ``wds``
  (a CLIP_benchmark webdataset: ``classnames.txt``, ``zeroshot_classification_templates.txt``,
  ``test/{0..n-1}.tar`` with ``cls`` and ``webp|png|jpg|jpeg`` members);
- :class:`Retrieval` (several captions per image) for ``coco`` / ``flickr30k`` (the Karpathy
  test split of ``dataset_coco.json`` / ``dataset_flickr30k.json``) and a retrieval ``wds``
  (``dataset_type.txt`` = retrieval, captions in ``txt``).

Each holds an image *source* (files, a uint8 array or tar members) that :class:`BenchmarkImages`
turns into a map-style Dataset (decode, resize the short side, center crop, normalise), so a
DataLoader decodes in parallel workers. Every problem with a set is one :class:`DatasetError`
line naming the file and what was expected. ImageNet class names (CLIP's), the 80 CLIP prompt
templates, the CIFAR templates and the wnid lists ship in ``llip_scale/eval/assets``.
"""
from __future__ import annotations

import json
import pickle
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from llip_scale.data.transforms import BadImage, eval_image
from llip_scale.errors import ConfigError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}
WDS_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")
CAPTIONS_PER_IMAGE = 5


class DatasetError(ConfigError):
    """An evaluation set is missing or not in the expected layout."""


# ---------------------------------------------------------------------------------------------
# Image sources: i -> encoded bytes or a PIL image, and a name for error messages
# ---------------------------------------------------------------------------------------------

@dataclass
class FileSource:
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> Union[bytes, Image.Image]:
        return self.paths[i].read_bytes()

    def name(self, i: int) -> str:
        return str(self.paths[i])


@dataclass
class ArraySource:
    pixels: np.ndarray  # uint8 [N, H, W, 3]
    origin: str

    def __len__(self) -> int:
        return len(self.pixels)

    def read(self, i: int) -> Union[bytes, Image.Image]:
        return Image.fromarray(self.pixels[i])

    def name(self, i: int) -> str:
        return f"{self.origin} image {i}"


@dataclass
class TarSource:
    members: list[tuple[Path, int, int, str]]  # (shard, data offset, size, member name)

    def __len__(self) -> int:
        return len(self.members)

    def read(self, i: int) -> Union[bytes, Image.Image]:
        shard, offset, size, _ = self.members[i]
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def name(self, i: int) -> str:
        return f"{self.members[i][0]}:{self.members[i][3]}"


Source = Union[FileSource, ArraySource, TarSource]


class BenchmarkImages(Dataset):
    """i -> (float32 ``[3, size, size]``, "" or the problem with image i). A bad image does not
    kill the worker: the evaluation loop raises one line naming it."""

    def __init__(self, source: Source, image_size: int):
        self.source, self.image_size = source, image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return eval_image(self.source.read(i), self.image_size), ""
        except (BadImage, OSError) as e:
            blank = torch.zeros(3, self.image_size, self.image_size)
            return blank, f"{self.source.name(i)}: not a readable image ({e})"


@dataclass
class Classification:
    name: str
    root: Path
    source: Source
    labels: list[int]
    classnames: list[str]
    templates: list[str]


@dataclass
class Retrieval:
    name: str
    root: Path
    source: Source
    captions: list[list[str]]  # captions[i] describe image i


Benchmark = Union[Classification, Retrieval]


# ---------------------------------------------------------------------------------------------
# Shipped data
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def asset_lines(name: str) -> tuple[str, ...]:
    """Lines of ``llip_scale/eval/assets/<name>`` (package data)."""
    text = (resources.files("llip_scale.eval") / "assets" / name).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def imagenet_classes() -> dict[str, tuple[int, str]]:
    """wnid -> (class index, CLIP's class name) for the 1000 ImageNet classes."""
    return {w: (i, n) for i, (w, n) in enumerate(zip(asset_lines("imagenet_wnids.txt"),
                                                      asset_lines("imagenet_classnames.txt")))}


# ---------------------------------------------------------------------------------------------
# ImageNet and its variants: one folder per class
# ---------------------------------------------------------------------------------------------

IMAGENET_VARIANTS = {  # name -> (subfolder of ROOT, wnid list restricting the classes, index folders)
    "imagenet1k": ("val", None, False),
    "imagenet-v2": ("", None, True),
    "imagenet-r": ("", "imagenet_r_wnids.txt", False),
    "imagenet-a": ("", "imagenet_a_wnids.txt", False),
    "imagenet-sketch": ("", None, False),
}


def _class_of_folder(folder: str, classes: dict[str, tuple[int, str]], wnids: list[str], allowed: set[str],
                     by_index: bool, where: Path, name: str) -> str:
    wnid = wnids[int(folder)] if by_index and folder.isdigit() and int(folder) < len(wnids) else folder
    if wnid not in classes:
        expected = "an ImageNet wnid (n01440764 ...)" + (" or a class index 0..999" if by_index else "")
        raise DatasetError(f"{name}: folder {where / folder} is not a class folder; expected {expected}")
    if wnid not in allowed:
        raise DatasetError(f"{name}: {where / folder} ({wnid}) is not one of the {len(allowed)} classes of {name}")
    return wnid


def load_imagenet(name: str, root: Path) -> Classification:
    """Folders of class images; the classes are the folders present, in ImageNet order."""
    sub, subset, by_index = IMAGENET_VARIANTS[name]
    where = root / sub if sub else root
    layout = f"{root}/{sub + '/' if sub else ''}{'<class index 0..999 or wnid>' if by_index else '<wnid>'}/*.JPEG"
    if not where.is_dir():
        raise DatasetError(f"{name}: folder {where} does not exist; expected {layout}")
    classes = imagenet_classes()
    wnids = list(classes)
    allowed = set(asset_lines(subset)) if subset else set(wnids)
    folders = sorted(p.name for p in where.iterdir() if p.is_dir() and not p.name.startswith("."))
    present = sorted({_class_of_folder(f, classes, wnids, allowed, by_index, where, name): f for f in folders}.items(),
                     key=lambda kv: classes[kv[0]][0])
    if not present:
        raise DatasetError(f"{name}: {where} holds no class folders; expected {layout}")
    paths, labels = [], []
    for label, (_, folder) in enumerate(present):
        files = sorted(p for p in (where / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DatasetError(f"{name}: the class folders under {where} hold no images; expected {layout}")
    return Classification(name, root, FileSource(paths), labels, [classes[w][1] for w, _ in present],
                          list(asset_lines("imagenet_templates.txt")))


# ---------------------------------------------------------------------------------------------
# CIFAR: the python pickles
# ---------------------------------------------------------------------------------------------

CIFAR = {  # name -> (folder, test file, meta file, label key, names key)
    "cifar10": ("cifar-10-batches-py", "test_batch", "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", "test", "meta", "fine_labels", "fine_label_names"),
}


class _NumpyOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing that could run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_pickle(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; expected {what}")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnly(f, encoding="latin1").load()
    except Exception as e:  # a pickle can fail in many ways; all mean "not the file we expect"
        raise DatasetError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); expected {what}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} holds a {type(obj).__name__}; expected {what}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def load_cifar(name: str, root: Path) -> Classification:
    folder, test, meta, label_key, names_key = CIFAR[name]
    where = root if (root / test).is_file() else root / folder
    what = f"the {name} python version ({folder}/{test} and {folder}/{meta})"
    batch = _read_pickle(where / test, f"a dict with 'data' [N, 3072] uint8 and '{label_key}': {what}")
    names = _read_pickle(where / meta, f"a dict with '{names_key}': {what}").get(names_key)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or labels is None \
            or len(labels) != len(data):
        raise DatasetError(f"{where / test}: expected 'data' uint8 [N, 3072] and N '{label_key}'; {what}")
    if not names or not all(0 <= int(y) < len(names) for y in labels):
        raise DatasetError(f"{where / meta}: expected '{names_key}' covering every label; {what}")
    classnames = [(n.decode() if isinstance(n, bytes) else str(n)).replace("_", " ") for n in names]
    pixels = np.ascontiguousarray(data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return Classification(name, root, ArraySource(pixels, str(where / test)), [int(y) for y in labels],
                          classnames, list(asset_lines("cifar_templates.txt")))


# ---------------------------------------------------------------------------------------------
# COCO and Flickr30k: the Karpathy test split
# ---------------------------------------------------------------------------------------------

KARPATHY = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}


def _karpathy_file(name: str, root: Path) -> Path:
    for candidate in (root / KARPATHY[name], root / "annotations" / KARPATHY[name]):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{name}: {root / KARPATHY[name]} does not exist; expected the Karpathy split file "
                       f"{KARPATHY[name]} in ROOT (or ROOT/annotations)")


def _image_path(name: str, root: Path, record: dict) -> Path:
    if name == "coco":
        return root / record.get("filepath", "") / record["filename"]
    return root / "flickr30k-images" / record["filename"]


def load_karpathy(name: str, root: Path, split: str = "test") -> Retrieval:
    path = _karpathy_file(name, root)
    what = "{'images': [{'filename', 'split', 'sentences': [{'raw'}]}]} (Karpathy's split file)"
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
        chosen = [r for r in images if r["split"] == split]
        captions = [[s["raw"].strip() for s in r["sentences"][:CAPTIONS_PER_IMAGE]] for r in chosen]
        paths = [_image_path(name, root, r) for r in chosen]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"{path}: not the expected JSON ({type(e).__name__}: {e}); expected {what}") from None
    if not chosen:
        raise DatasetError(f"{path}: no image has split '{split}'; expected {what}")
    bad = next((p for p, c in zip(paths, captions) if not c), None)
    if bad is not None:
        raise DatasetError(f"{path}: image {bad.name} has no sentences; expected up to {CAPTIONS_PER_IMAGE} per image")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        layout = "ROOT/<filepath>/<filename>" if name == "coco" else "ROOT/flickr30k-images/<filename>"
        raise DatasetError(f"{name}: image {missing[0]} does not exist ({len(missing)} of {len(paths)} missing); "
                           f"expected the images at {layout}")
    return Retrieval(name, root, FileSource(paths), captions)


# ---------------------------------------------------------------------------------------------
# CLIP_benchmark webdatasets
# ---------------------------------------------------------------------------------------------

def _text_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; expected {what}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise DatasetError(f"{path} is empty; expected {what}")
    return lines


def _wds_shards(root: Path, split: str) -> list[Path]:
    where = root / split
    count = where / "nshards.txt"
    if count.is_file():
        try:
            n = int(count.read_text().strip())
        except ValueError:
            raise DatasetError(f"{count}: expected the number of shards") from None
        shards = [where / f"{i}.tar" for i in range(n)]
    else:
        key = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
        shards = sorted(where.glob("*.tar"), key=key)
    missing = [s for s in shards if not s.is_file()]
    if not shards or missing:
        raise DatasetError(f"wds: shard {missing[0] if missing else where / '0.tar'} does not exist; expected "
                           f"{where}/{{0..n-1}}.tar (and {where}/nshards.txt) as CLIP_benchmark writes them")
    return shards


def _wds_samples(shards: Sequence[Path]) -> list[dict[str, tuple[Path, int, int, str]]]:
    """Members grouped into samples by key (the name up to the first dot of its basename)."""
    samples: dict[str, dict] = {}
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    folder, _, base = m.name.rpartition("/")
                    key, _, ext = base.partition(".")
                    sample = samples.setdefault(f"{shard}/{folder}/{key}", {})
                    sample[ext.lower()] = (shard, m.offset_data, m.size, m.name)
        except (tarfile.TarError, OSError) as e:
            raise DatasetError(f"wds: {shard} is not a readable tar ({e}); expected a webdataset shard") from None
    return list(samples.values())


def _member_text(member: tuple[Path, int, int, str]) -> str:
    return TarSource([member]).read(0).decode("utf-8").strip()


def load_wds(name: str, root: Path, split: str = "test") -> Benchmark:
    kind = root / "dataset_type.txt"
    retrieval = kind.is_file() and kind.read_text().strip().lower() == "retrieval"
    shards = _wds_shards(root, split)
    samples = _wds_samples(shards)
    label_key = "txt" if retrieval else "cls"
    keep = [s for s in samples if label_key in s and any(k in s for k in WDS_IMAGE_KEYS)]
    if not keep:
        raise DatasetError(f"wds: {shards[0]} holds no sample with '{label_key}' and an image "
                           f"({'|'.join(WDS_IMAGE_KEYS)}); expected CLIP_benchmark's webdataset layout")
    source = TarSource([next(s[k] for k in WDS_IMAGE_KEYS if k in s) for s in keep])
    texts = [_member_text(s[label_key]) for s in keep]
    if retrieval:
        return Retrieval(f"wds/{root.name}", root, source, [[c for c in t.splitlines() if c.strip()] for t in texts])
    classnames = _text_lines(root / "classnames.txt", "one class name per line")
    templates = [t.replace("{c}", "{}") for t in _text_lines(root / "zeroshot_classification_templates.txt",
                                                            "one prompt template per line, '{c}' for the class")]
    try:
        labels = [int(t) for t in texts]
    except ValueError:
        raise DatasetError(f"wds: a 'cls' member in {shards[0].parent} is not an integer; "
                           "expected the class index") from None
    if not all(0 <= y < len(classnames) for y in labels):
        raise DatasetError(f"wds: a 'cls' label is outside 0..{len(classnames) - 1} "
                           f"(the lines of {root / 'classnames.txt'})")
    return Classification(f"wds/{root.name}", root, source, labels, classnames, templates)


# ---------------------------------------------------------------------------------------------
# By name
# ---------------------------------------------------------------------------------------------

READERS: dict[str, Callable[[str, Path], Benchmark]] = {
    **{n: load_imagenet for n in IMAGENET_VARIANTS},
    **{n: load_cifar for n in CIFAR},
    **{n: load_karpathy for n in KARPATHY},
    "wds": load_wds,
}


def parse_spec(spec: str) -> tuple[str, Path]:
    """``NAME=ROOT`` -> (NAME, ROOT)."""
    name, sep, root = spec.partition("=")
    if not sep or not root:
        raise DatasetError(f"--dataset '{spec}': expected NAME=ROOT, NAME one of {', '.join(READERS)}")
    if name not in READERS:
        raise DatasetError(f"--dataset '{spec}': unknown dataset '{name}'; expected one of {', '.join(READERS)}")
    return name, Path(root).expanduser()


def load_benchmark(name: str, root: str | Path) -> Benchmark:
    """The set ``name`` at ``root``, checked (raises :class:`DatasetError`)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{name}: {root} does not exist; expected the dataset's root folder")
    return READERS[name](name, root)

