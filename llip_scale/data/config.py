"""Data config: shard sources, loader workers, tokenizer, transforms."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class DataConfig:
    # webdataset: shards named by `shards`; synthetic: a seeded generated stream (tests, smoke runs).
    source: Literal["webdataset", "synthetic"] = "webdataset"
    shards: str = ""  # webdataset spec: brace patterns, several sources separated by '::'
    tokenizer: str = field(default="", metadata={"path": "file"})  # sentencepiece model file
    context_length: Optional[int] = None  # None: the text tower's context_length
    workers: int = 2
    seed: int = 0

    def validate(self, name: str) -> None:
        if self.workers < 0:
            from llip_scale.config import ConfigError
            raise ConfigError(f"{name}.workers must be >= 0, got {self.workers}")
