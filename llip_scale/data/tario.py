"""Streaming tar reader: members -> samples grouped by key, with exact truncation detection.

Flow: a binary stream (a file or a command's stdout; gzip detected by its magic bytes) ->
512-byte headers parsed here (ustar, GNU long names, pax paths) -> ``(name, bytes)`` for each
regular file -> consecutive files sharing a key (the path up to the first '.' of the file name,
as webdataset does) -> one sample dict ``{"__key__": key, ext: bytes, ...}``.

Python's ``tarfile`` treats an archive cut inside or right after a header as a normal end, so a
truncated shard would go unnoticed; here an archive must end with its zero block, and anything
else raises :class:`TarError` with reason ``truncated_tar`` (or ``bad_tar`` for garbage).
"""
from __future__ import annotations

import gzip
import zlib
from typing import IO, Iterator

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR_TYPES = (b"0", b"\0", b"7")


class TarError(Exception):
    """The archive is cut short or corrupt; ``reason`` is the skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _read(stream: IO[bytes], n: int) -> bytes:
    try:
        return stream.read(n)
    except (EOFError, zlib.error) as e:  # a cut or corrupt gzip layer
        raise TarError("truncated_tar", f"compressed stream ends early ({e})") from None
    except gzip.BadGzipFile as e:
        raise TarError("bad_tar", f"bad gzip data ({e})") from None


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header(block: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of one header block; checks the checksum."""
    try:
        stored, size = _number(block[148:156]), _number(block[124:136])
    except ValueError:
        raise TarError("bad_tar", "malformed header (not a tar file, or corrupt)") from None
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise TarError("bad_tar", "header checksum mismatch (not a tar file, or corrupt)")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and block[345] != 0:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, block[156:157]


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, kv = record.partition(b" ")
        key, _, value = kv.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None


def _maybe_gunzip(stream: IO[bytes]) -> IO[bytes]:
    head = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
    return gzip.GzipFile(fileobj=stream, mode="rb") if head == b"\x1f\x8b" else stream


def iter_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """``(path, data)`` of every regular file, in archive order."""
    for _, path, data in iter_placed_members(stream):
        yield path, data


def iter_placed_members(stream: IO[bytes], base: int = 0) -> Iterator[tuple[int | None, str, bytes]]:
    """``(offset, path, data)`` of every regular file; ``offset`` is where the member's first
    header (its long-name header, if any) starts in the raw stream, ``base`` being the offset of
    the stream's first byte, so a reader can start again there; None inside a gzip layer."""
    plain = _maybe_gunzip(stream)
    pos = base if plain is stream else None
    stream = plain
    long_name: str | None = None
    start, extended = pos, False  # extended: a long-name or pax header belongs to the next member
    while True:
        if not extended:
            start = pos
        block = _read(stream, BLOCK)
        if len(block) < BLOCK:
            raise TarError("truncated_tar", "archive ends without its end-of-archive block")
        if block == ZERO_BLOCK:
            return
        name, size, kind = _header(block)
        data = _read(stream, size)
        padding = _read(stream, -size % BLOCK)
        if len(data) < size or len(padding) < -size % BLOCK:
            raise TarError("truncated_tar", f"archive ends inside member '{name}'")
        if pos is not None:
            pos += BLOCK + size + -size % BLOCK
        extended = kind in (b"L", b"x")
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == b"x":  # pax extended header of the next member
            long_name = _pax_path(data) or long_name
        elif kind in REGULAR_TYPES:
            yield start, (long_name or name), data
            long_name = None
        else:  # directories, links, global pax headers: nothing to read
            long_name = None if kind != b"g" else long_name


def split_key(path: str) -> tuple[str, str] | None:
    """``"dir/000123.txt"`` -> ``("dir/000123", "txt")``; None for hidden or extension-less files."""
    folder, _, base = path.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(stream: IO[bytes]) -> Iterator[dict]:
    """Samples of one archive; a :class:`TarError` drops the sample being assembled."""
    for _, sample in iter_placed_samples(stream):
        yield sample


def iter_placed_samples(stream: IO[bytes], base: int = 0) -> Iterator[tuple[int | None, dict]]:
    """``(offset, sample)``: each sample with the raw offset of its first member's header (see
    :func:`iter_placed_members`), from which a reader of the same archive finds the same sample
    and the ones after it."""
    current: dict = {}
    start: int | None = None
    for offset, path, data in iter_placed_members(stream, base):
        parts = split_key(path)
        if parts is None:
            continue
        key, ext = parts
        if current and current["__key__"] != key:
            yield start, current
            current = {}
        if not current:
            start = offset
        current.setdefault("__key__", key)
        current[ext] = data
    if current:
        yield start, current
