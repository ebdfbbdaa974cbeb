"""Data config: shard sources, streams, loader workers, tokenizer, shuffling, bad-data limits,
transforms; :func:`stream_count` resolves ``data.streams`` for a global batch and a world size."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from llip_scale.errors import ConfigError, check

AUTO_STREAMS = 8  # what data.streams=0 aims for: enough for 8 workers on one rank, any world size up to 8


@dataclass
class DataConfig:
    # webdataset: shards named by `shards`; synthetic: a seeded generated stream (tests, smoke runs).
    source: Literal["webdataset", "synthetic"] = "webdataset"
    # Webdataset spec: brace patterns ("shard-{000000..000099}.tar"), local paths, folders of
    # .tar files, "s3://bucket/shard-{0..9}.tar" (or gs://) or "pipe:COMMAND"; several sources
    # separated by '::'.
    shards: str = ""
    # Sampling weight per source (same order as in `shards`); empty: proportional to shard counts.
    weights: list[float] = field(default_factory=list)
    tokenizer: str = field(default="", metadata={"path": "file"})  # sentencepiece model file
    context_length: Optional[int] = None  # None: the text tower's context_length
    # Independent sample streams the global batch is drawn from, batch_size / streams samples from
    # each per step, in stream order; fixed for the run (saved with the data state) and spread over
    # ranks and workers, so the data order depends on neither. 0: auto (see stream_count).
    streams: int = 0
    workers: int = 2  # DataLoader worker processes per rank (0: load in the training process)
    seed: int = 0  # mixed with the run seed: changes the data order without changing the init
    shuffle_buffer: int = 1000  # samples; shuffles within each shard, reset at shard boundaries
    prefetch: int = 2  # steps prefetched per worker (a step: the next chunk of each of its streams)
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range
    max_skip_rate: float = 0.05  # stop when a stream skips more than this fraction of samples
    skip_check_after: int = 1000  # samples a stream sees before the skip rate is enforced
    log_keys: bool = False  # write a digest of each global batch's sample keys to metrics.jsonl
    # Object-store shards (s3://, gs://): attempts after a transient fault (each continues at the
    # byte the read stopped at), the first wait between them (doubled each time), the timeout of
    # one request, and the bytes each stream reads ahead in the background (0: none).
    s3_retries: int = 8
    s3_backoff: float = 0.5
    s3_timeout: float = 60.0
    prefetch_bytes: int = 64 << 20

    def validate(self, name: str) -> None:
        check(self.streams >= 0, f"{name}.streams must be >= 0 (0: auto), got {self.streams}")
        check(self.workers >= 0, f"{name}.workers must be >= 0, got {self.workers}")
        check(self.context_length is None or self.context_length >= 2,
               f"{name}.context_length must be >= 2 (or null for the text tower's), "
               f"got {self.context_length}")
        check(self.shuffle_buffer >= 1, f"{name}.shuffle_buffer must be >= 1 (1 disables shuffling)")
        check(self.prefetch >= 1, f"{name}.prefetch must be >= 1, got {self.prefetch}")
        scale = tuple(self.crop_scale)
        check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
               f"{name}.crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(self.crop_scale)}")
        check(0 <= self.max_skip_rate < 1,
               f"{name}.max_skip_rate must be in [0, 1), got {self.max_skip_rate}")
        check(self.skip_check_after >= 1, f"{name}.skip_check_after must be >= 1")
        check(all(w >= 0 for w in self.weights) and (not self.weights or sum(self.weights) > 0),
               f"{name}.weights must be >= 0 with a positive sum, got {self.weights}")
        check(self.s3_retries >= 0, f"{name}.s3_retries must be >= 0, got {self.s3_retries}")
        check(self.s3_backoff >= 0, f"{name}.s3_backoff must be >= 0 seconds, got {self.s3_backoff}")
        check(self.s3_timeout > 0, f"{name}.s3_timeout must be > 0 seconds, got {self.s3_timeout}")
        check(self.prefetch_bytes >= 0,
              f"{name}.prefetch_bytes must be >= 0 (0: no prefetch), got {self.prefetch_bytes}")
        if self.source == "webdataset" and any(s.strip().startswith(("s3://", "gs://"))
                                               for s in self.shards.split("::")):
            from llip_scale.data.objects import require_boto3  # only for object-store sources

            require_boto3(f"{name}.shards")
        n_sources = len([s for s in self.shards.split("::") if s.strip()])
        check(not self.weights or len(self.weights) == n_sources,
               f"{name}.weights has {len(self.weights)} entries but {name}.shards names "
               f"{n_sources} source(s); give one weight per source or none")


def stream_count(streams: int, batch_size: int, world_size: int) -> int:
    """The number of streams of a run: ``streams``, checked, or for 0 the smallest multiple of
    ``world_size`` that is at least :data:`AUTO_STREAMS` and divides ``batch_size`` (else the
    largest multiple that divides it), so that by default every world size that divides 8 gets
    the same 8 streams. ``batch_size`` is the global batch, a multiple of ``world_size``."""
    if batch_size % world_size:
        raise ConfigError(f"batch_size={batch_size} is not divisible by the {world_size} ranks; "
                          f"set batch_size to a multiple of {world_size}")
    if streams == 0:
        fits = [s for s in range(world_size, batch_size + 1, world_size) if batch_size % s == 0]
        return next((s for s in fits if s >= AUTO_STREAMS), fits[-1])
    if batch_size % streams:
        raise ConfigError(f"batch_size={batch_size} is not a multiple of data.streams={streams}; each step takes "
                          f"the same number of samples from every stream: set data.streams to a divisor of "
                          f"batch_size (or 0 for auto)")
    if streams % world_size:
        raise ConfigError(f"data.streams={streams} is not a multiple of the {world_size} ranks; each rank reads "
                          f"whole streams: use a world size that divides {streams}, or set data.streams to a "
                          f"multiple of {world_size} that divides batch_size={batch_size}")
    return streams
