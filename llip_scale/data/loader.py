"""The training loader of one rank: its share of the run's streams, in global order, exact state.

A run draws its global batches from ``S = data.streams`` streams (:mod:`llip_scale.data.stream`):
global batch ``n`` is chunk ``n`` of stream 0, then chunk ``n`` of stream 1, and so on, each of
``C = batch_size / S`` samples, so it depends on the data config, the seeds and ``n`` only. Rank
``r`` of ``W`` owns streams ``[r*S/W, (r+1)*S/W)``, whose chunks are exactly its slice
``[r*B/W, (r+1)*B/W)`` of the global batch; its workers share those streams (worker ``j`` of
``w`` runs the rank's streams ``j, j+w, ...``).

Flow: ``build_train_loader`` -> :class:`TrainLoader` -> on iteration a ``DataLoader`` over
:class:`_WorkerStreams` (each worker yields one item per step: the next chunk of each of its
streams; ``batch_size=None`` here) -> the DataLoader hands items back in request order, strict
round-robin over the workers, so step ``n`` is items ``[n*w, (n+1)*w)`` -> the chunks are put in
stream order and concatenated into the rank's :class:`Batch`, whose ``state`` holds the state of
each stream the rank owns after that step.

Resuming: every stream restarts from its own saved state, so the number of workers never
matters, and :func:`reshard_state` turns the states saved by all ranks of one world size into
the state of one rank of another.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import logging
import multiprocessing
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llip_scale.data.config import DataConfig, stream_count
from llip_scale.data.shards import object_options, parse_sources, sources_fingerprint
from llip_scale.data.stream import DataError, Stream, StreamChunk, StreamSpec, merge_skipped, stream_seeds
from llip_scale.data.tokenizer import Tokenizer
from llip_scale.dist.signals import ignore_stop_signals, stop_signals_blocked
from llip_scale.errors import ConfigError

log = logging.getLogger("llip_scale.data")
STATE_VERSION = 2  # 1: one stream per (rank, worker), tied to the world size and data.workers
LOG_EVERY = 100  # batches between skip summaries


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, 3, S, S], OpenAI mean/std normalised
    tokens: torch.Tensor  # int64 [B, context_length]
    state: dict  # picklable; resuming from it yields exactly the batches after this one
    skipped: dict[str, int]  # reason -> samples skipped by this rank's streams since the start of the run
    captions: list[str] = field(default_factory=list)  # the caption drawn for each sample
    keys: list[str] = field(default_factory=list)  # each sample's key (webdataset ``__key__``)
    # kind -> object-store reads this rank's streams retried since the start of the run
    retries: dict[str, int] = field(default_factory=dict)


def owned_streams(streams: int, rank: int, world_size: int) -> range:
    """The streams rank ``rank`` of ``world_size`` reads (``streams`` is a multiple of ``world_size``)."""
    per_rank = streams // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def keys_digest(keys: Sequence[str]) -> str:
    """SHA-256 (hex) of sample keys in order: equal digests, equal data in equal order."""
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode() + b"\n")
    return h.hexdigest()


def _init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``. Schedulers signal every process of a job step (Slurm: TERM
    on preemption and requeue, the job's --signal before the time limit): only the training
    process decides what to do (save at a step boundary, then exit), so workers ignore those
    signals. Workers still end when the loader shuts them down (a message on their queue), when
    the training process dies (torch's watchdog), and on SIGHUP, which :func:`_end_workers` sends."""
    ignore_stop_signals()
    # A clean exit: torch's SIGCHLD handler in the training process reports a worker killed by
    # a signal as an error.
    signal.signal(signal.SIGHUP, lambda *_: os._exit(0))


@atexit.register  # runs before multiprocessing's own exit hook (registered earlier, run later)
def _end_workers() -> None:
    """At interpreter exit multiprocessing ends daemonic children with SIGTERM, then waits for
    them; workers of a loader still open ignore SIGTERM (see :func:`_init_worker`), so end them
    with SIGHUP first, or the exit would wait forever."""
    for child in multiprocessing.active_children():
        if child.daemon and child.pid is not None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(child.pid, signal.SIGHUP)


def _no_collate(item: object) -> object:
    """Batches are built in the workers; keep them exactly as they come."""
    return item


class _WorkerStreams(IterableDataset):
    """Worker ``j`` of ``workers`` runs the rank's streams ``j, j + workers, ...`` from their
    states, yielding one item per step: ``("step", n, [chunk of each of its streams])``."""

    def __init__(self, spec: StreamSpec, states: list[dict], workers: int, step: int):
        self.spec, self.states, self.workers, self.step = spec, states, workers, step

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        mine = self.states[(info.id if info else 0)::self.workers]
        try:
            streams = [Stream(self.spec, st["stream"], st).chunks() for st in mine]
            for step in itertools.count(self.step):
                yield "step", step, [next(chunks) for chunks in streams]
        except DataError as e:  # one clean line in the training process, not a worker traceback
            yield "error", str(e)


class TrainLoader:
    """Infinite batches of one rank; ``state_dict`` / ``load_state_dict`` resume exactly."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int,
                 image_size: int, tokenizer: Tokenizer, seed: int):
        if not 0 <= rank < world_size:
            raise ConfigError(f"data loader: rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or image_size < 1:
            raise ConfigError(f"data loader: batch_size ({batch_size}) and image_size "
                              f"({image_size}) must be >= 1")
        if cfg.context_length is not None and tokenizer.context_length != cfg.context_length:
            raise ConfigError(f"tokenizer context_length {tokenizer.context_length} differs from "
                              f"data.context_length {cfg.context_length}; use the same value")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.global_batch = batch_size * world_size
        self.sources = parse_sources(cfg.shards, cfg.weights)
        if not any(s.urls and s.weight > 0 for s in self.sources):
            raise ConfigError(f"data.shards '{cfg.shards}' names no shards with a positive "
                              f"weight; check_sources(cfg) tells which source is wrong")
        self.image_size, self.tokenizer = image_size, tokenizer
        self.seeds = stream_seeds(seed, cfg.seed)
        self._use_streams(stream_count(cfg.streams, self.global_batch, world_size))
        self._logged_skips = (0, -LOG_EVERY)  # (count, batch) of the last summary line

    def _use_streams(self, streams: int) -> None:
        """Read ``streams`` streams (those of this rank), each from its start."""
        self.n_streams = streams
        self.owned = owned_streams(streams, self.rank, self.world_size)
        # A worker without a stream would have nothing to do: at most one per owned stream.
        self.workers = min(self.cfg.workers, len(self.owned))
        cfg = self.cfg
        self.spec = StreamSpec(
            sources=tuple(self.sources), seeds=self.seeds, chunk_size=self.global_batch // streams,
            image_size=self.image_size, tokenizer=self.tokenizer, shuffle_buffer=cfg.shuffle_buffer,
            crop_scale=tuple(cfg.crop_scale), max_skip_rate=cfg.max_skip_rate,
            skip_check_after=cfg.skip_check_after, objects=object_options(cfg))
        self._meta = {"version": STATE_VERSION, "streams": streams, "batch_size": self.global_batch,
                      "image_size": self.image_size, "seeds": list(self.seeds),
                      "sources": sources_fingerprint(self.sources)}
        self._streams = [Stream(self.spec, s).state_dict() for s in self.owned]
        self._batches = 0

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """State after the last batch handed out (equal to that batch's ``.state``)."""
        return {**self._meta, "batches": self._batches, "stream_states": list(self._streams)}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch whose ``.state`` this is (a state of this rank and world
        size: :func:`reshard_state` makes one from a run on another); call before iterating."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError("data state is not a per-stream state of this loader version (it predates "
                              "data.streams); its data stream cannot be continued: train in a new run_dir")
        saved = state.get("streams")
        if self.cfg.streams == 0 and saved != self.n_streams and isinstance(saved, int) and saved > 0:
            check_shared(saved, self.world_size)  # auto: a run keeps the streams it started with
            if self.global_batch % saved == 0:
                self._use_streams(saved)
        for key, ours in self._meta.items():
            theirs = state.get(key)
            if theirs != ours:
                raise ConfigError(f"data state was saved with {_what_differs(key, theirs, ours)}; resume with "
                                  f"the same batch_size, data.streams, seeds and shards, or train in a new "
                                  f"run_dir")
        held = [st["stream"] for st in state["stream_states"]]
        if held != list(self.owned):
            raise ConfigError(f"data state holds streams {held} but rank {self.rank} of {self.world_size} reads "
                              f"streams {list(self.owned)}; build its state with reshard_state from every "
                              f"rank's saved state")
        self._streams = list(state["stream_states"])
        self._batches = int(state["batches"])

    # -- iteration --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        workers = max(self.workers, 1)
        dataset = _WorkerStreams(self.spec, list(self._streams), workers, self._batches)
        if self.workers == 0:
            source: Iterator[tuple] = iter(dataset)
        else:
            # A generator of its own: iter(DataLoader) draws the workers' base seed from it, not
            # from the global RNG, whose state a checkpoint saves and a resume must reproduce.
            # The streams are seeded explicitly, so this seed only feeds torch's worker RNGs.
            # The workers ignore a scheduler's stop signals (see _init_worker); until they do,
            # the signals are blocked in them, from the fork on.
            generator = torch.Generator().manual_seed(self.spec.seeds[0] + self._batches)
            with stop_signals_blocked():
                source = iter(DataLoader(dataset, batch_size=None, num_workers=self.workers,
                                         collate_fn=_no_collate, prefetch_factor=self.cfg.prefetch,
                                         pin_memory=torch.cuda.is_available(), generator=generator,
                                         worker_init_fn=_init_worker))
        while True:
            chunks: dict[int, StreamChunk] = {}
            for _ in range(workers):  # one item per worker and step, in worker order
                item = next(source)
                if item[0] == "error":
                    raise DataError(item[1])
                if item[1] != self._batches:  # the assembly needs it
                    raise RuntimeError(f"data: a worker sent step {item[1]} while step {self._batches} "
                                       f"was being assembled, breaking the round-robin order")
                chunks.update((c.stream, c) for c in item[2])
            yield self._accept([chunks[s] for s in self.owned])

    def _accept(self, chunks: list[StreamChunk]) -> Batch:
        self._streams = [c.state for c in chunks]
        self._batches += 1
        skipped = merge_skipped(self._streams)
        total = sum(skipped.values())
        # A summary when the count changed, at most every LOG_EVERY batches (streams log details).
        if total != self._logged_skips[0] and self._batches >= self._logged_skips[1] + LOG_EVERY:
            self._logged_skips = (total, self._batches)
            log.info("data: rank %d skipped %d sample(s) so far: %s", self.rank, total, skipped)
        return Batch(torch.cat([c.images for c in chunks]), torch.cat([c.tokens for c in chunks]),
                     self.state_dict(), skipped, [t for c in chunks for t in c.captions],
                     [k for c in chunks for k in c.keys], merge_skipped(self._streams, "retries"))


def _what_differs(key: str, theirs: Any, ours: Any) -> str:
    names = {"sources": "different data.shards or data.weights",
             "streams": f"data.streams={theirs} but this run has data.streams={ours}",
             "batch_size": f"batch_size={theirs} but this run has batch_size={ours}",
             "seeds": f"(seed, data.seed)={theirs} but this run has {ours}"}
    return names.get(key, f"{key}={theirs!r} but this run has {key}={ours!r}")


def check_shared(streams: int, world_size: int) -> None:
    """A ConfigError unless ``world_size`` ranks can share ``streams`` saved streams."""
    if streams % world_size:
        raise ConfigError(f"the data state holds {streams} streams, which {world_size} ranks cannot share "
                          f"(each rank reads whole streams); resume on a number of ranks that divides "
                          f"{streams}")


def reshard_state(states: Sequence[Any], rank: int, world_size: int) -> Any:
    """The data state of rank ``rank`` of ``world_size`` from the states every rank of a run
    saved (in rank order, on any number of ranks): the saved states of the streams it owns now.
    A state that is the same on every rank (the synthetic source's batch counter) passes
    through; no state (``None`` everywhere) gives ``None``."""
    if all(st is None for st in states):
        return None
    if not all(isinstance(st, dict) and st.get("version") == STATE_VERSION for st in states):
        if all(st == states[0] for st in states):
            return states[0]
        raise ConfigError("the ranks' saved data states differ and are not per-stream states of this loader "
                          "version (they predate data.streams); train in a new run_dir")
    meta = _common_meta(states)
    by_stream = {stream_state["stream"]: stream_state for st in states for stream_state in st["stream_states"]}
    if sorted(by_stream) != list(range(meta["streams"])):
        raise ConfigError(f"the saved data states hold {len(by_stream)} of {meta['streams']} streams; pass the "
                          f"state of every rank of the checkpoint, in rank order")
    check_shared(meta["streams"], world_size)
    return {**meta, "stream_states": [by_stream[s] for s in owned_streams(meta["streams"], rank, world_size)]}


def _common_meta(states: Sequence[dict]) -> dict:
    """What every rank's state must agree on (all but the stream states); a ConfigError when the
    states cannot come from one checkpoint."""
    meta = {k: v for k, v in states[0].items() if k != "stream_states"}
    for i, st in enumerate(states):
        differ = sorted(k for k in set(meta) | set(st) if k != "stream_states" and st.get(k) != meta.get(k))
        if differ:
            raise ConfigError(f"the saved data state of rank {i} differs from rank 0's in {', '.join(differ)}; "
                              f"the states do not come from one checkpoint")
    held = Counter(stream_state["stream"] for st in states for stream_state in st["stream_states"])
    twice = sorted(s for s, n in held.items() if n > 1)
    if twice:
        raise ConfigError(f"stream {twice[0]} is in the saved data state of two ranks; the states do not come "
                          f"from one checkpoint")
    return meta


def build_train_loader(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int,
                       image_size: int, tokenizer: Tokenizer, seed: int) -> TrainLoader:
    """The infinite, exactly resumable training loader of one rank (see :class:`TrainLoader`);
    ``batch_size`` is the rank's share of the global batch."""
    return TrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size,
                       image_size=image_size, tokenizer=tokenizer, seed=seed)
