"""Config of the pair computation (all images x all texts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from llip_scale.errors import check

Backend = Literal["auto", "reference", "chunked", "triton"]


@dataclass
class LossConfig:
    backend: Backend = "auto"  # auto: triton on CUDA, chunked elsewhere
    chunk_size: Optional[int] = None  # texts per block for `chunked`; None sizes it from memory

    def validate(self, name: str) -> None:
        check(self.chunk_size is None or self.chunk_size >= 1,
              f"{name}.chunk_size must be >= 1 or null, got {self.chunk_size}")
