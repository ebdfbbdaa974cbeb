"""A deterministic generated image-text stream with the interface of the training loader.

Selected by ``data.source: synthetic``; used by smoke runs and by the exact-resume tests.
Sample number ``g`` of a split (counted over all ranks: batch ``n`` of rank ``r`` holds samples
``n * B_global + r * B_local + i``) is a pure function of ``(seed, split, g)``:

    class c ~ U{0..CLASSES-1}  ->  image = smooth class pattern + noise   [3, S, S]
                               ->  caption = two class words, random filler words, EOT, padding

so captions carry the class and a model can learn to match them. The loader state is the next
batch number, the same on every rank; resuming from ``batch.state`` yields the batches after
that one, and the global batches do not depend on how many ranks share them. A sample's key
(``batch.keys``) is ``SPLIT-g``.
"""
from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from llip_scale.data.config import DataConfig
from llip_scale.data.loader import Batch
from llip_scale.errors import ConfigError

CLASSES = 32
SPLITS = {"train": 0, "heldout": 1}
FIRST_WORD = 3  # ids below are special (pad 0, bos 1, eot 2 in the packaged tokenizers)


class SyntheticTokenizer:
    """Word-hashing tokenizer with the attributes of the sentencepiece one."""

    def __init__(self, vocab_size: int, context_length: int, eot_id: int = 2, pad_id: int = 0):
        if vocab_size < FIRST_WORD + 2 * CLASSES + 8:
            raise ValueError(f"the synthetic source needs vocab_size >= {FIRST_WORD + 2 * CLASSES + 8}, "
                             f"got {vocab_size}; raise model.text.vocab_size")
        self.vocab_size, self.context_length = vocab_size, context_length
        self.eot_id, self.pad_id = eot_id, pad_id

    def __call__(self, texts: list[str]) -> Tensor:
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [FIRST_WORD + zlib.crc32(w.encode()) % (self.vocab_size - FIRST_WORD) for w in text.split()]
            ids = ids[: self.context_length - 1] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


class SyntheticLoader:
    """Infinite stream of :class:`Batch` for one rank; see the module docstring."""

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world_size: int, image_size: int,
                 tokenizer: SyntheticTokenizer, seed: int, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.image_size, self.tok = image_size, tokenizer
        self.seed, self.split = seed + cfg.seed, SPLITS[split]
        self.next_batch = 0
        self._patterns: dict[int, Tensor] = {}

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch, "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch whose ``.state`` this is; call before iterating."""

        global_batch = self.batch_size * self.world_size
        if not isinstance(state, dict) or state.get("global_batch") != global_batch:
            saved = state.get("global_batch") if isinstance(state, dict) else None
            raise ConfigError(f"data state was saved with global batch {saved}, this run uses {global_batch}; "
                              "resume with the batch_size it was saved with")
        self.next_batch = int(state["next_batch"])

    # -- samples ------------------------------------------------------------------------------
    def _pattern(self, c: int) -> Tensor:
        if c not in self._patterns:
            rng = np.random.default_rng([self.seed, 1_000 + c])
            coarse = torch.from_numpy(rng.standard_normal((1, 3, 4, 4)).astype(np.float32))
            self._patterns[c] = F.interpolate(coarse, size=(self.image_size,) * 2, mode="bilinear",
                                              align_corners=False)[0]
        return self._patterns[c]

    def sample(self, index: int) -> tuple[Tensor, Tensor]:
        """Image [3, S, S] and caption tokens [L] of global sample ``index``."""
        rng = np.random.default_rng([self.seed, self.split, index])
        c = int(rng.integers(CLASSES))
        noise = rng.standard_normal((3, self.image_size, self.image_size)).astype(np.float32)
        image = self._pattern(c) + 0.5 * torch.from_numpy(noise)
        length = self.tok.context_length
        filler = rng.integers(FIRST_WORD + 2 * CLASSES, self.tok.vocab_size, size=int(rng.integers(0, length - 2)))
        ids = [FIRST_WORD + 2 * c, FIRST_WORD + 2 * c + 1, *filler.tolist(), self.tok.eot_id]
        tokens = torch.full((length,), self.tok.pad_id, dtype=torch.long)
        tokens[: len(ids)] = torch.tensor(ids[:length])
        return image, tokens

    def batch(self, n: int) -> Batch:
        first = n * self.batch_size * self.world_size + self.rank * self.batch_size
        images, tokens = zip(*(self.sample(first + i) for i in range(self.batch_size)))
        state = {"next_batch": n + 1, "global_batch": self.batch_size * self.world_size}
        keys = [f"{self.split}-{first + i:012d}" for i in range(self.batch_size)]
        return Batch(torch.stack(images), torch.stack(tokens), state, {}, keys=keys)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            out = self.batch(self.next_batch)
            self.next_batch += 1
            yield out
