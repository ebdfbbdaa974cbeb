"""Config of the pair computation (all images x all texts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Backend = Literal["auto", "reference", "chunked", "triton"]


@dataclass
class LossConfig:
    backend: Backend = "auto"  # auto: triton on CUDA, chunked elsewhere
    chunk_size: Optional[int] = None  # texts per block for `chunked`; None sizes it from memory

    def validate(self, name: str) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            from llip_scale.config import ConfigError
            raise ConfigError(f"{name}.chunk_size must be >= 1 or null, got {self.chunk_size}")
