"""Small generated shards and a tokenizer for the data tests (no downloads, a few KB each)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from llip_scale.data import Tokenizer, train_tokenizer
from llip_scale.data.writer import ShardWriter, sample_files

WORDS = ("red", "green", "blue", "circle", "square", "small", "large", "left", "right", "above")


def image_bytes(i: int, size: tuple[int, int] = (24, 20), fmt: str = "PNG") -> bytes:
    """A small image whose pixels depend on ``i`` (so batches from different samples differ)."""
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def caption(i: int, k: int = 0) -> str:
    return f"good {WORDS[i % len(WORDS)]} {WORDS[(i // 3 + k) % len(WORDS)]} {i} {k}"


def write_good_shards(out: Path, shards: int = 4, per_shard: int = 12, prefix: str = "shard-",
                      start: int = 0) -> str:
    """Shards of valid samples; every third sample has three captions. Returns the brace spec."""
    with ShardWriter(out, per_shard, prefix) as w:
        for i in range(start, start + shards * per_shard):
            caps = [caption(i, k) for k in range(3 if i % 3 == 0 else 1)]
            w.write(f"{i:09d}", sample_files(image_bytes(i), "png", caps))
    return w.spec()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of the given (name, data) members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def good_members(i: int) -> list[tuple[str, bytes]]:
    return [(f"{i:09d}.png", image_bytes(i)), (f"{i:09d}.txt", caption(i).encode())]


def make_tokenizer(out: Path, context_length: int = 16) -> Tokenizer:
    texts = [caption(i, k) for i in range(200) for k in range(3)] + ["bad text", "ok"]
    path = out / "tok.model"
    if not path.exists():
        train_tokenizer(texts, str(path), vocab_size=128)
    return Tokenizer(str(path), context_length)
