"""The training loader of one rank: W worker streams interleaved round-robin, exact state.

Flow: ``build_train_loader`` -> :class:`TrainLoader` -> on iteration a ``DataLoader`` over
:class:`_WorkerStreams` (batching happens in the workers, ``batch_size=None`` here) -> the
DataLoader hands batches back in request order, which for an iterable dataset is strict
round-robin over the workers -> each batch carries its stream's state; the loader keeps the
latest state per stream plus the batch count, which is the rank state stored in ``batch.state``.

Resuming: batch ``k`` came from stream ``k % W``, so the next one comes from stream
``batches % W``. DataLoader always asks worker slot 0 first, so slot ``j`` runs stream
``(j + batches) % W``; every stream restarts from its own saved state.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llip_scale.data.config import DataConfig
from llip_scale.data.shards import parse_sources, sources_fingerprint
from llip_scale.data.stream import DataError, Stream, StreamSpec, merge_skipped, stream_seeds
from llip_scale.data.tokenizer import Tokenizer
from llip_scale.errors import ConfigError
from llip_scale.train.distributed import ignore_stop_signals

log = logging.getLogger("llip_scale.data")
STATE_VERSION = 1
LOG_EVERY = 100  # batches between skip summaries


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, 3, S, S], OpenAI mean/std normalised
    tokens: torch.Tensor  # int64 [B, context_length]
    state: dict  # picklable; resuming from it yields exactly the batches after this one
    skipped: dict[str, int]  # reason -> samples skipped on this rank since the start of the run
    captions: list[str] = field(default_factory=list)  # the caption drawn for each sample


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
    """Worker slot ``j`` runs stream ``(j + start) % n_streams`` from its saved state."""

    def __init__(self, spec: StreamSpec, states: list[dict | None], start: int):
        self.spec, self.states, self.start = spec, states, start

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        stream = ((info.id if info else 0) + self.start) % len(self.states)
        try:
            for b in Stream(self.spec, stream, self.states[stream]).batches():
                yield "batch", b.images, b.tokens, b.state, b.captions
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
        self.workers = cfg.workers
        self.n_streams = max(cfg.workers, 1)
        sources = parse_sources(cfg.shards, cfg.weights)
        if not any(s.urls and s.weight > 0 for s in sources):
            raise ConfigError(f"data.shards '{cfg.shards}' names no shards with a positive "
                              f"weight; check_sources(cfg) tells which source is wrong")
        self.spec = StreamSpec(
            sources=tuple(sources), seeds=stream_seeds(seed, cfg.seed), rank=rank,
            batch_size=batch_size, image_size=image_size, tokenizer=tokenizer,
            shuffle_buffer=cfg.shuffle_buffer, crop_scale=tuple(cfg.crop_scale),
            max_skip_rate=cfg.max_skip_rate, skip_check_after=cfg.skip_check_after)
        self._meta = {"version": STATE_VERSION, "rank": rank, "world_size": world_size,
                      "worker_streams": self.n_streams, "batch_size": batch_size,
                      "image_size": image_size, "seeds": list(self.spec.seeds),
                      "sources": sources_fingerprint(sources)}
        self._streams: list[dict | None] = [None] * self.n_streams
        self._batches = 0
        self._logged_skips = (0, -LOG_EVERY)  # (count, batch) of the last summary line

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """State after the last batch handed out (equal to that batch's ``.state``)."""
        return {**self._meta, "batches": self._batches, "streams": list(self._streams)}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch whose ``.state`` this is; call before iterating."""

        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError("data state is not a state of this loader version; start the "
                              "data stream fresh (do not load it)")
        for key, ours in self._meta.items():
            theirs = state.get(key)
            if theirs == ours:
                continue
            what = {"sources": "different data.shards or data.weights",
                    "worker_streams": f"data.workers={theirs} but this run has "
                                      f"data.workers={self.workers} (0 counts as 1)"}.get(
                key, f"{key}={theirs!r} but this run has {key}={ours!r}")
            raise ConfigError(f"data state was saved with {what}; resume with the same world "
                              f"size, data.workers, batch size, seeds and shards, or start the "
                              f"data stream fresh")
        self._streams = list(state["streams"])
        self._batches = int(state["batches"])

    # -- iteration --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        start = self._batches % self.n_streams
        dataset = _WorkerStreams(self.spec, list(self._streams), start)
        if self.workers == 0:
            source: Iterator[tuple] = iter(dataset)
        else:
            # A generator of its own: iter(DataLoader) draws the workers' base seed from it, not
            # from the global RNG, whose state a checkpoint saves and a resume must reproduce.
            # The streams are seeded explicitly, so this seed only feeds torch's worker RNGs.
            # The workers ignore a scheduler's stop signals (see _init_worker).
            generator = torch.Generator().manual_seed(self.spec.seeds[0] + self._batches)
            source = iter(DataLoader(dataset, batch_size=None, num_workers=self.workers,
                                     collate_fn=_no_collate, prefetch_factor=self.cfg.prefetch,
                                     pin_memory=torch.cuda.is_available(), generator=generator,
                                     worker_init_fn=_init_worker))
        for item in source:
            if item[0] == "error":
                raise DataError(item[1])
            yield self._accept(*item[1:])

    def _accept(self, images: torch.Tensor, tokens: torch.Tensor, stream_state: dict,
                captions: list[str]) -> Batch:
        if stream_state["stream"] != self._batches % self.n_streams:  # the resume math needs it
            raise RuntimeError(f"data: batch {self._batches} came from stream "
                               f"{stream_state['stream']}, breaking the round-robin order")
        self._streams[stream_state["stream"]] = stream_state
        self._batches += 1
        skipped = merge_skipped(self._streams)
        total = sum(skipped.values())
        # A summary when the count changed, at most every LOG_EVERY batches (workers log details).
        if total != self._logged_skips[0] and self._batches >= self._logged_skips[1] + LOG_EVERY:
            self._logged_skips = (total, self._batches)
            log.info("data: rank %d skipped %d sample(s) so far: %s", self.rank, total, skipped)
        return Batch(images, tokens, self.state_dict(), skipped, captions)


def build_train_loader(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int,
                       image_size: int, tokenizer: Tokenizer, seed: int) -> TrainLoader:
    """The infinite, exactly resumable training loader of one rank (see :class:`TrainLoader`)."""
    return TrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size,
                       image_size=image_size, tokenizer=tokenizer, seed=seed)
