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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from llip_scale.data import samples as sample_parsing
from llip_scale.data.shards import ShardOpenError, ShardSampler, Source, open_shard
from llip_scale.data.tario import TarError, iter_samples
from llip_scale.data.tokenizer import Tokenizer
from llip_scale.data.transforms import BadImage, decode_image, normalize, train_crop

log = logging.getLogger("llip_scale.data")
TAG_SHUFFLE, TAG_AUGMENT = 3, 4


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
        self._warned: set[str] = set()

    def state_dict(self) -> dict:
        return {"stream": self.stream, "sampler": self.sampler.state_dict(),
                "shard": dict(self.shard) if self.shard else None,
                "rng": self.rng.bit_generator.state, "good": self.good,
                "skipped": dict(self.skipped)}

    # -- raw samples ------------------------------------------------------------------------

    def _raw(self) -> Iterator[dict | _Skip]:
        """Raw samples (or shard-level skips) in stream order, forever."""
        if self.shard is not None:  # resuming inside a shard: replay it, drop what was consumed
            yield from self._shard_outputs(skip=self.shard["consumed"])
        while True:
            index, url = self.sampler.next()
            self.shard = {"index": index, "url": url, "consumed": 0}
            yield from self._shard_outputs(skip=0)

    def _shard_outputs(self, skip: int) -> Iterator[dict | _Skip]:
        for n, item in enumerate(self._shuffled(self.shard["url"], self.shard["index"])):
            if n < skip:
                continue
            self.shard["consumed"] = n + 1
            yield item

    def _shuffled(self, url: str, index: int) -> Iterator[dict | _Skip]:
        """The shard's samples through a seeded shuffle buffer, then its problem if any."""
        rng = np.random.default_rng(self.seeds + [TAG_SHUFFLE, index])
        buffer: list[dict] = []
        count, problem = 0, None
        try:
            with open_shard(url) as f:
                if f.peek(1) == b"":
                    problem = _Skip("zero_byte_shard", "shard is empty (0 bytes)")
                else:
                    for sample in iter_samples(f):
                        count += 1
                        if len(buffer) < self.spec.shuffle_buffer:
                            buffer.append(sample)
                            continue
                        j = int(rng.integers(len(buffer)))
                        buffer[j], sample = sample, buffer[j]
                        yield sample
        except (TarError, ShardOpenError) as e:
            problem = _Skip(e.reason, str(e))
        except OSError as e:  # an I/O error in the middle of the shard (network file systems)
            problem = _Skip("unreadable_shard", f"read failed: {e}")
        order = rng.permutation(len(buffer)) if buffer else []
        for j in order:
            yield buffer[j]
        if problem is None and count == 0:
            problem = _Skip("empty_shard", "shard holds no files")
        if problem is not None:
            yield problem

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


def stream_seeds(seed: int, data_seed: int) -> tuple[int, int]:
    """Non-negative seed words for numpy's SeedSequence."""
    return seed % (1 << 63), data_seed % (1 << 63)


def merge_skipped(states: Sequence[dict | None]) -> dict[str, int]:
    """Sum of the skip counters of several stream states."""
    total: dict[str, int] = {}
    for st in states:
        for reason, n in (st["skipped"] if st else {}).items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))
