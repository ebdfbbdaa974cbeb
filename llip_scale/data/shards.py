"""Shard specs: brace expansion, weighted sources, checks, the resampled shard order, opening.

Flow: ``DataConfig.shards`` ("a/{000..009}.tar::pipe:cat b/{0..3}.tar") -> :func:`parse_sources`
(one :class:`Source` per '::' part, its shard URLs expanded, a sampling weight; ``s3://`` and
``gs://`` sources need boto3, see :mod:`llip_scale.data.objects`) ->
:func:`check_sources` before training (missing or empty sources raise ``ConfigError``) ->
in each of the run's streams a :class:`ShardSampler` draws the next shard as a pure function of
(seeds, stream, position, per-source draw counts), whichever rank or worker runs the stream, so
its state is two small integers' worth and a resumed stream continues the same order ->
:func:`open_shard` yields a byte stream (object-store shards: the stream's
:class:`~llip_scale.data.objects.Prefetcher`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np

from llip_scale.data.config import DataConfig
from llip_scale.data.objects import ObjectOptions, ShardOpenError, head, is_object_url, require_boto3
from llip_scale.errors import ConfigError

PIPE = "pipe:"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Tags that keep the random streams derived from one seed apart.
TAG_SOURCE, TAG_PERMUTATION = 1, 2


@dataclass(frozen=True)
class Source:
    """One '::'-separated part of the shard spec."""

    spec: str  # as written in the config
    urls: tuple[str, ...]  # local paths, "pipe:COMMAND" or "s3://bucket/key", one per shard
    weight: float

    @property
    def is_pipe(self) -> bool:
        return self.spec.startswith(PIPE)

    @property
    def is_object(self) -> bool:
        return is_object_url(self.spec)


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{000..099}`` ranges (zero padding kept), left to right.

    >>> expand_braces("s-{0..2}-{a,b}.tar")[:3]
    ['s-0-a.tar', 's-0-b.tar', 's-1-a.tar']
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, end = 0, -1
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            end = i
            break
    if end < 0:
        raise ValueError(f"unbalanced '{{' in shard pattern '{pattern}'")
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    tails = expand_braces(tail)
    return [head + alt + t for option in _brace_options(body) for alt in expand_braces(option)
            for t in tails]


def _brace_options(body: str) -> list[str]:
    """The alternatives inside one pair of braces: a numeric range or a comma list."""
    parts = body.split("..")
    if len(parts) == 2 and all(p.strip().lstrip("-").isdigit() for p in parts):
        lo, hi = int(parts[0]), int(parts[1])
        width = max(len(parts[0]), len(parts[1])) if parts[0].startswith("0") or \
            parts[1].startswith("0") else 0
        step = 1 if hi >= lo else -1
        return [str(i).zfill(width) for i in range(lo, hi + step, step)]
    options, depth, current = [], 0, ""
    for ch in body:  # split on top-level commas only, so nested braces stay whole
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            options.append(current)
            current = ""
        else:
            current += ch
    return options + [current]


def _expand_source(spec: str) -> tuple[str, ...]:
    if spec.startswith(PIPE):
        return tuple(PIPE + cmd for cmd in expand_braces(spec[len(PIPE):]))
    if is_object_url(spec):
        return tuple(expand_braces(spec))
    path = spec[len("file:"):] if spec.startswith("file:") else spec
    if os.path.isdir(path):  # a folder: every tar shard inside it, in name order
        return tuple(str(p) for p in sorted(Path(path).iterdir())
                     if p.name.endswith(TAR_SUFFIXES) and p.is_file())
    return tuple(expand_braces(path))


def parse_sources(shards: str, weights: Sequence[float] = ()) -> list[Source]:
    """Split the spec on '::', expand each source; weights default to the shard counts."""
    specs = [s.strip() for s in shards.split("::") if s.strip()]
    if weights and len(weights) != len(specs):
        raise ConfigError(f"data.weights has {len(weights)} entries for {len(specs)} source(s) "
                          f"in data.shards; give one weight per source or none")
    if any(is_object_url(s) for s in specs):
        require_boto3("data.shards")
    try:
        expanded = [_expand_source(s) for s in specs]
    except ValueError as e:
        raise ConfigError(f"data.shards: {e}") from None
    ws = list(weights) if weights else [float(len(u)) for u in expanded]
    return [Source(s, u, float(w)) for s, u, w in zip(specs, expanded, ws)]


def check_sources(cfg: DataConfig) -> list[Source]:
    """Raise ``ConfigError`` naming the first missing or empty source; return the sources."""

    if not cfg.shards.strip():
        raise ConfigError("data.shards is empty; set it to a shard spec such as "
                          "'data/demo/train/shard-{000000..000015}.tar'")
    sources = parse_sources(cfg.shards, cfg.weights)
    for i, src in enumerate(sources):
        name = f"data source {i + 1} '{src.spec}'"
        if not src.urls:
            raise ConfigError(f"{name} matches no shards; check the path or brace pattern")
        if src.is_pipe:
            _check_pipe(src, name)
        elif src.is_object:
            _check_object(src, name, object_options(cfg))
        else:
            _check_local(src, name)
    if sum(s.weight for s in sources if s.urls) <= 0:
        raise ConfigError("data.weights are all zero; give at least one source a positive weight")
    return sources


def _check_local(src: Source, name: str) -> None:
    sizes = [_file_size(u) for u in src.urls]
    missing = [u for u, size in zip(src.urls, sizes) if size is None]
    if missing:
        raise ConfigError(f"{name}: {len(missing)} of {len(src.urls)} shard(s) do not exist, "
                          f"first missing: {missing[0]}; fix data.shards or create the shards")
    if not any(sizes):
        raise ConfigError(f"{name}: every shard is empty (0 bytes); regenerate the shards "
                          f"or remove the source from data.shards")


def _file_size(path: str) -> int | None:
    """Size of a regular file, None if it is missing or not a file (one stat call)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def object_options(cfg: DataConfig) -> ObjectOptions:
    return ObjectOptions(retries=cfg.s3_retries, backoff=cfg.s3_backoff, timeout=cfg.s3_timeout,
                         prefetch_bytes=cfg.prefetch_bytes)


def _check_object(src: Source, name: str, options: ObjectOptions) -> None:
    """The first shard of an object-store source exists and is readable (one HEAD request:
    listing a bucket of 100k shards would take long, and a fault passes)."""
    try:
        head(src.urls[0], options)
    except ShardOpenError as e:
        raise ConfigError(f"{name}: {e}; check the bucket, the key pattern and the credentials "
                          f"(AWS_* variables, AWS_PROFILE, AWS_ENDPOINT_URL)") from None


def _check_pipe(src: Source, name: str) -> None:
    for url in src.urls[:1]:  # the same program serves every shard of a source
        words = shlex.split(url[len(PIPE):])
        if not words:
            raise ConfigError(f"{name}: 'pipe:' needs a command, e.g. 'pipe:cat shard-0.tar'")
        if shutil.which(words[0]) is None:
            raise ConfigError(f"{name}: command '{words[0]}' not found on PATH; install it "
                              f"or fix the pipe: command")


def sources_fingerprint(sources: Sequence[Source]) -> str:
    """Identity of the shard lists and weights, independent of where the folder lives."""
    h = hashlib.sha1()
    for src in sources:
        h.update(f"{src.weight!r}:{len(src.urls)}:".encode())
        for url in src.urls:
            h.update(os.path.basename(url.rstrip("/")).encode() + b"\0")
    return h.hexdigest()[:16]


class ShardSampler:
    """Infinite, resampled shard order of one stream.

    Each draw picks a source by weight, then that source's next shard from a seeded permutation
    (a new permutation per pass over the source), so every shard of a source is visited once per
    pass and the order differs between streams. Draw ``p`` depends only on (seeds, p, draw
    counts), which is the whole state.
    """

    def __init__(self, sources: Sequence[Source], seeds: Sequence[int], state: dict | None = None):
        self.sources = [s for s in sources]
        weights = np.array([s.weight if s.urls else 0.0 for s in sources], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.seeds = list(seeds)
        self.position = int(state["position"]) if state else 0
        self.draws = list(state["draws"]) if state else [0] * len(sources)
        self._perm_key: tuple[int, int] | None = None
        self._perm: np.ndarray | None = None

    def state_dict(self) -> dict:
        return {"position": self.position, "draws": list(self.draws)}

    def next(self) -> tuple[int, str]:
        """(position of this draw, shard URL)."""
        index = self.position
        if len(self.sources) > 1:
            rng = np.random.default_rng(self.seeds + [TAG_SOURCE, index])
            s = int(rng.choice(len(self.sources), p=self.probs))
        else:
            s = 0
        count = len(self.sources[s].urls)
        epoch, i = divmod(self.draws[s], count)
        url = self.sources[s].urls[int(self._permutation(s, epoch, count)[i])]
        self.draws[s] += 1
        self.position += 1
        return index, url

    def _permutation(self, source: int, epoch: int, count: int) -> np.ndarray:
        if self._perm_key != (source, epoch):
            rng = np.random.default_rng(self.seeds + [TAG_PERMUTATION, source, epoch])
            self._perm, self._perm_key = rng.permutation(count), (source, epoch)
        return self._perm


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[IO[bytes]]:
    """A buffered binary stream over a local shard or the stdout of a ``pipe:`` command."""
    if url.startswith(PIPE):
        with _open_pipe(url[len(PIPE):]) as stream:
            yield stream
        return
    path = url[len("file:"):] if url.startswith("file:") else url
    try:
        f = open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise ShardOpenError("unreadable_shard", f"cannot open: {e.strerror or e}") from None
    with f:
        yield f


@contextlib.contextmanager
def _open_pipe(command: str) -> Iterator[IO[bytes]]:
    """The command's stdout. Its stderr is held until it ends: shown when the command ended on
    its own (a warning, or why it failed), dropped when the reader closed the pipe first, since
    a command still writing then fails with 'Broken pipe' (Python programs such as the aws CLI
    ignore SIGPIPE and print it) while the archive it was sending had been read to its end."""
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            bufsize=1 << 20)
    errors = _Collect(proc.stderr)
    try:
        if not proc.stdout.peek(1):  # no output at all: tell a failing command from an empty one
            code = proc.wait()
            if code != 0:
                errors.join()
                last = errors.last_line()
                raise ShardOpenError("unreadable_shard", f"command exited with status {code}"
                                     + (f": {last}" if last else ""))
        yield proc.stdout
    finally:
        ended_first = proc.poll() is not None
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        errors.join()
        if ended_first and errors.text:
            sys.stderr.buffer.write(errors.text)
            sys.stderr.flush()


class _Collect:
    """Reads a pipe to its end in a thread (a command blocked on a full stderr pipe would never
    end), keeping the last 64 KiB."""

    LIMIT = 1 << 16

    def __init__(self, pipe: IO[bytes]):
        self.pipe, self.text = pipe, b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with self.pipe:
            for line in self.pipe:
                self.text = (self.text + line)[-self.LIMIT:]

    def join(self) -> None:
        self.thread.join(timeout=10)  # a grandchild of the shell may hold stderr a little longer

    def last_line(self) -> str:
        lines = self.text.decode("utf-8", "replace").strip().splitlines()
        return lines[-1].strip() if lines else ""
