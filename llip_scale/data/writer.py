"""Writing shards in the img2dataset layout: ``OUT/shard-000000.tar`` holding ``KEY.jpg``,
``KEY.txt`` (the first caption) and ``KEY.json`` (``{"captions": [...], ...}``).

Flow: samples (key, {ext: bytes}) -> :class:`ShardWriter` -> a new tar every N samples, written
to ``*.tar.tmp`` and renamed when complete, so a crash never leaves a half shard under the final
name. Headers carry fixed owner and time, so the same input gives byte-identical shards.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Sequence


def sample_files(image: bytes, image_ext: str, captions: Sequence[str],
                 meta: dict | None = None) -> dict[str, bytes]:
    """The files of one sample: the image, the first caption as txt, all captions in json."""
    ext = "jpg" if image_ext.lower() in ("jpg", "jpeg") else image_ext.lower()
    record = {"captions": list(captions), **(meta or {})}
    return {ext: image, "txt": (captions[0] if captions else "").encode("utf-8"),
            "json": json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")}


class ShardWriter:
    """Write samples into numbered tar shards of ``samples_per_shard`` samples each."""

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int = 1000,
                 prefix: str = "shard-", digits: int = 6):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.per_shard, self.prefix, self.digits = samples_per_shard, prefix, digits
        self.paths: list[str] = []
        self.count = 0  # samples written
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample; ``files`` maps extensions (``jpg``, ``txt``, ``json``) to bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key '{key}' must not contain '.' or '/'")
        if self._tar is None or self.count % self.per_shard == 0:
            self._next_shard()
        for ext in sorted(files, key=lambda e: (e not in ("jpg", "png", "webp", "jpeg"), e)):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(files[ext]), 0, 0o644
            self._tar.addfile(info, io.BytesIO(files[ext]))
        self.count += 1

    def _next_shard(self) -> None:
        self._finish()
        final = self.out_dir / f"{self.prefix}{len(self.paths):0{self.digits}d}.tar"
        self._tmp = final.with_name(final.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
        self.paths.append(str(final))

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self.paths[-1])
            self._tar = None

    def close(self) -> list[str]:
        """Finish the last shard; the paths of all shards written."""
        self._finish()
        return list(self.paths)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spec(self) -> str:
        """A brace spec naming every shard written, for ``data.shards``."""
        last = len(self.paths) - 1
        first = f"{0:0{self.digits}d}"
        if last <= 0:
            return str(self.out_dir / f"{self.prefix}{first}.tar")
        return str(self.out_dir / f"{self.prefix}{{{first}..{last:0{self.digits}d}}}.tar")
