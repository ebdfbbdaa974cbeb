"""One deterministic, exactly resumable stream of sample chunks; a run has ``data.streams`` of them.

Stream ``s`` is the same whichever rank or worker runs it: its shard order, shuffles, captions
and crops are seeded by (run seed, ``data.seed``, ``s``) only. Flow inside a stream (a
DataLoader worker, or the training process with ``workers=0``):

    ShardSampler.next() -> shard URL at position p
      -> open_shard -> iter_samples (raw bytes per key)
      -> shuffle buffer seeded by (seeds, s, p)              <- replayable from the shard start
      -> raw sample #n of the shard (n = ``consumed``)
      -> caption drawn, image decoded, RandomResizedCrop      <- the stream's generator
      -> C good samples -> normalised images, tokens, keys, and the stream state after the last one

C is the stream's share of a global batch (``batch_size / streams``). The state after a chunk is
(shard position and draw counts, URL and ``consumed`` of the current shard, generator state,
counters). Resuming re-opens that one shard, replays its shuffle without decoding, drops the
first ``consumed`` outputs and continues: the next chunk is bit-identical to the one an
uninterrupted run would have produced. Shard-level problems (zero-byte, truncated, unreadable,
empty) are the last output of their shard, so a replay never counts them twice.

Object-store shards (``s3://``, ``gs://``) also record ``first`` and ``offset``: the ordinal and
raw byte offset of the earliest sample the rest of the shard's outputs need (the oldest one still
in the shuffle buffer). The shuffle's moves depend on sample counts only, so a resume replays
them with placeholders for the samples before ``first`` and reads the shard from ``offset`` on
(one ranged GET): the same outputs without fetching the bytes before it. Local shards replay
from their start, as before; states without the two keys do the same.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import IO, Iterator, Sequence

import numpy as np
import torch

from llip_scale.data import samples as sample_parsing
from llip_scale.data.objects import ObjectOptions, Prefetcher, RetryCounts, direct, is_object_url
from llip_scale.data.shards import ShardOpenError, ShardSampler, Source, open_shard
from llip_scale.data.tario import TarError, iter_placed_samples
from llip_scale.data.tokenizer import Tokenizer
from llip_scale.data.transforms import BadImage, decode_image, normalize, train_crop

log = logging.getLogger("llip_scale.data")
TAG_SHUFFLE, TAG_AUGMENT = 3, 4
PREFETCH_SHARDS = 2  # draws past the current shard whose object-store shards are read ahead


class DataError(RuntimeError):
    """Too much bad data: training stops, naming the shard."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything a stream needs; picklable, sent to every DataLoader worker."""

    sources: tuple[Source, ...]
    seeds: tuple[int, ...]  # (run seed, data seed)
    chunk_size: int  # samples per chunk: the stream's share of one global batch
    image_size: int
    tokenizer: Tokenizer
    shuffle_buffer: int = 1000
    crop_scale: tuple[float, float] = (0.9, 1.0)
    max_skip_rate: float = 0.05
    skip_check_after: int = 1000
    objects: ObjectOptions = ObjectOptions()


@dataclass
class _Skip:
    """A shard-level problem, emitted as the last output of its shard."""

    reason: str
    detail: str


@dataclass
class StreamChunk:
    stream: int
    images: torch.Tensor  # float32 [C, 3, S, S]
    tokens: torch.Tensor  # int64 [C, L]
    state: dict  # the stream's state after this chunk
    captions: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the samples' webdataset keys (``__key__``)


class Stream:
    """Infinite chunks of stream ``stream``; ``state`` resumes it exactly."""

    def __init__(self, spec: StreamSpec, stream: int, state: dict | None = None):
        self.spec, self.stream = spec, stream
        self.seeds = [*spec.seeds, stream]
        self.sampler = ShardSampler(spec.sources, self.seeds, state["sampler"] if state else None)
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seeds + [TAG_AUGMENT])))
        if state:
            self.rng.bit_generator.state = state["rng"]
        self.shard: dict | None = dict(state["shard"]) if state and state["shard"] else None
        self.good = state["good"] if state else 0
        self.skipped: dict[str, int] = dict(state["skipped"]) if state else {}
        self.retries = RetryCounts(dict(state.get("retries", {})) if state else {})
        self._warned: set[str] = set()
        self._shuffle: _Shuffle | None = None  # the current shard's
        self._prefetcher: Prefetcher | None = None

    def state_dict(self) -> dict:
        return {"stream": self.stream, "sampler": self.sampler.state_dict(),
                "shard": self._shard_state(), "rng": self.rng.bit_generator.state,
                "good": self.good, "skipped": dict(self.skipped), "retries": self.retries.snapshot()}

    def _shard_state(self) -> dict | None:
        if self.shard is None:
            return None
        shard = {k: self.shard[k] for k in ("index", "url", "consumed")}
        point = self._shuffle.restart_point() if self._shuffle and is_object_url(shard["url"]) else None
        if point is not None:
            shard["first"], shard["offset"] = point
        return shard

    # -- raw samples ------------------------------------------------------------------------

    def _raw(self) -> Iterator[dict | _Skip]:
        """Raw samples (or shard-level skips) in stream order, forever."""
        try:
            if self.shard is not None:  # resuming inside a shard: replay it, drop what was consumed
                yield from self._shard_outputs(self.shard)
            while True:
                index, url = self.sampler.next()
                self.shard = {"index": index, "url": url, "consumed": 0}
                yield from self._shard_outputs(self.shard)
        finally:  # the stream is done with: stop its background reads
            if self._prefetcher is not None:
                self._prefetcher.close()
                self._prefetcher = None

    def _shard_outputs(self, shard: dict) -> Iterator[dict | _Skip]:
        skip = shard["consumed"]
        for n, item in enumerate(self._shuffled(shard)):
            if n < skip:
                continue
            if item is None:  # a placeholder: the restart point was wrong
                raise RuntimeError(f"data: output {n} of shard {shard['url']} precedes the resume offset")
            self.shard["consumed"] = n + 1
            yield item

    def _shuffled(self, shard: dict) -> Iterator[dict | _Skip | None]:
        """The shard's samples through a seeded shuffle buffer, then its problem if any. From a
        restart point (``first``, ``offset``) the samples before ``first`` are None: their
        outputs were consumed before the state was saved."""
        first, offset = (shard["first"], shard["offset"]) if "offset" in shard else (0, 0)
        rng = np.random.default_rng(self.seeds + [TAG_SHUFFLE, shard["index"]])
        self._shuffle = shuffle = _Shuffle(self.spec.shuffle_buffer, rng)
        problem = None
        try:
            with self._open(shard["index"], shard["url"], offset) as f:
                if offset == 0 and f.peek(1) == b"":
                    problem = _Skip("zero_byte_shard", "shard is empty (0 bytes)")
                else:
                    placed = ((k, at, sample) for k, (at, sample) in
                              enumerate(iter_placed_samples(f, offset), first))
                    unread = ((k, None, None) for k in range(first))
                    for entry in shuffle.feed(itertools.chain(unread, placed)):
                        yield entry[2]
        except (TarError, ShardOpenError) as e:
            problem = _Skip(e.reason, str(e))
        except OSError as e:  # an I/O error in the middle of the shard (network file systems)
            problem = _Skip("unreadable_shard", f"read failed: {e}")
        for entry in shuffle.drain():
            yield entry[2]
        if problem is None and shuffle.last is None:
            problem = _Skip("empty_shard", "shard holds no files")
        if problem is not None:
            yield problem

    def _open(self, index: int, url: str, offset: int) -> contextlib.AbstractContextManager[IO[bytes]]:
        if not is_object_url(url):
            return open_shard(url)
        options = self.spec.objects
        if options.prefetch_bytes == 0:
            return direct(url, offset, options, self.retries)
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(options, self.retries)
        return self._prefetcher.open(index, url, offset, self._upcoming())

    def _upcoming(self) -> list[tuple[int, str]]:
        """The object-store shards among the next draws of the shard order (a copy of it)."""
        sampler = ShardSampler(self.spec.sources, self.seeds, self.sampler.state_dict())
        draws = [sampler.next() for _ in range(PREFETCH_SHARDS)]
        return [(i, u) for i, u in draws if is_object_url(u)]

    # -- decoded samples and batches ---------------------------------------------------------

    def _decode(self, sample: dict) -> tuple[np.ndarray, str]:
        texts = sample_parsing.captions(sample)
        caption = texts[int(self.rng.integers(len(texts)))] if len(texts) > 1 else texts[0]
        try:
            img = decode_image(sample_parsing.image_bytes(sample))
        except BadImage as e:
            raise sample_parsing.SkipSample("bad_image", str(e)) from None
        return train_crop(img, self.spec.image_size, self.rng, self.spec.crop_scale), caption

    def _count_skip(self, reason: str, detail: str, key: str | None) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        url = self.shard["url"] if self.shard else "?"
        where = f"sample '{key}' of shard {url}" if key else f"shard {url}"
        level = logging.DEBUG if reason in self._warned else logging.WARNING
        self._warned.add(reason)
        log.log(level, "data: skipped %s (%s: %s)", where, reason, detail)
        bad = sum(self.skipped.values())
        seen = bad + self.good
        if seen >= self.spec.skip_check_after and bad / seen > self.spec.max_skip_rate:
            raise DataError(
                f"data: stream {self.stream} skipped {bad} of {seen} samples "
                f"({bad / seen:.1%} > data.max_skip_rate={self.spec.max_skip_rate}); last bad "
                f"shard: {url} ({reason}: {detail}); fix or remove that shard, or raise "
                f"data.max_skip_rate")

    def chunks(self) -> Iterator[StreamChunk]:
        images: list[np.ndarray] = []
        texts: list[str] = []
        keys: list[str] = []
        for item in self._raw():
            if isinstance(item, _Skip):
                self._count_skip(item.reason, item.detail, None)
                continue
            try:
                image, caption = self._decode(item)
            except sample_parsing.SkipSample as e:
                self._count_skip(e.reason, str(e), item.get("__key__"))
                continue
            self.good += 1
            images.append(image)
            texts.append(caption)
            keys.append(str(item.get("__key__", "")))
            if len(images) == self.spec.chunk_size:
                yield StreamChunk(self.stream, normalize(np.stack(images)), self.spec.tokenizer(texts),
                                  self.state_dict(), texts, keys)
                images, texts, keys = [], [], []


class _Shuffle:
    """The seeded shuffle buffer of one shard over ``(ordinal, raw offset, sample)`` entries.

    Its moves depend on the number of samples and the generator only, never on their bytes, so
    entries a resume does not need can be placeholders; :meth:`restart_point` says which.
    """

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.buffer: list[tuple] = []
        self.tail: list[tuple] | None = None  # after the last sample: the rest, in reverse output order
        self.last: tuple | None = None  # the last entry read

    def feed(self, entries: Iterator[tuple]) -> Iterator[tuple]:
        for entry in entries:
            self.last = entry
            if len(self.buffer) < self.size:
                self.buffer.append(entry)
                continue
            j = int(self.rng.integers(len(self.buffer)))
            self.buffer[j], entry = entry, self.buffer[j]
            yield entry

    def drain(self) -> Iterator[tuple]:
        order = self.rng.permutation(len(self.buffer)) if self.buffer else []
        self.tail = [self.buffer[j] for j in order][::-1]
        self.buffer = []
        while self.tail:
            yield self.tail.pop()

    def restart_point(self) -> tuple[int, int] | None:
        """(ordinal, raw offset) of the earliest sample the outputs still to come need: the
        oldest one held, else the last one read (reading on from it meets the shard's end or
        problem again); None when an offset is unknown (a gzip layer)."""
        held = self.tail if self.tail is not None else self.buffer
        entry = min(held, key=lambda e: e[0]) if held else self.last
        if entry is None:
            return 0, 0
        return (entry[0], entry[1]) if entry[1] is not None else None


def stream_seeds(seed: int, data_seed: int) -> tuple[int, int]:
    """Non-negative seed words for numpy's SeedSequence."""
    return seed % (1 << 63), data_seed % (1 << 63)


def merge_skipped(states: Sequence[dict | None], counter: str = "skipped") -> dict[str, int]:
    """Sum of the skip counters (or ``counter``: "retries") of several stream states."""
    total: dict[str, int] = {}
    for st in states:
        for reason, n in (st.get(counter, {}) if st else {}).items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))
