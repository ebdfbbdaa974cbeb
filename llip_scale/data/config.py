"""Data config: shard sources, loader workers, tokenizer, shuffling, bad-data limits, transforms."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from llip_scale.errors import check


@dataclass
class DataConfig:
    # webdataset: shards named by `shards`; synthetic: a seeded generated stream (tests, smoke runs).
    source: Literal["webdataset", "synthetic"] = "webdataset"
    # Webdataset spec: brace patterns ("shard-{000000..000099}.tar"), local paths, folders of
    # .tar files or "pipe:COMMAND"; several sources separated by '::'.
    shards: str = ""
    # Sampling weight per source (same order as in `shards`); empty: proportional to shard counts.
    weights: list[float] = field(default_factory=list)
    tokenizer: str = field(default="", metadata={"path": "file"})  # sentencepiece model file
    context_length: Optional[int] = None  # None: the text tower's context_length
    workers: int = 2  # DataLoader worker processes per rank (0: load in the training process)
    seed: int = 0  # mixed with the run seed: changes the data order without changing the init
    shuffle_buffer: int = 1000  # samples; shuffles within each shard, reset at shard boundaries
    prefetch: int = 2  # batches prefetched per worker
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range
    max_skip_rate: float = 0.05  # stop when a worker skips more than this fraction of samples
    skip_check_after: int = 1000  # samples a worker sees before the skip rate is enforced

    def validate(self, name: str) -> None:
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
        n_sources = len([s for s in self.shards.split("::") if s.strip()])
        check(not self.weights or len(self.weights) == n_sources,
               f"{name}.weights has {len(self.weights)} entries but {name}.shards names "
               f"{n_sources} source(s); give one weight per source or none")
