"""What a run's config asks of the data: its tokenizer, a check of its sources, its loaders.

Flow: ``cfg.data.source`` picks the path: ``synthetic`` (generated scenes and captions, no files)
or ``webdataset`` (tar shards through the resumable stream of :mod:`llip_scale.data.loader`);
the tokenizer is the synthetic one, CLIP's BPE (packaged) when the model has CLIP's vocabulary
and no tokenizer file is given, or the SentencePiece model of ``data.tokenizer``.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from llip_scale.config import Config, local_batch_size
from llip_scale.data.loader import build_train_loader
from llip_scale.data.shards import check_sources
from llip_scale.data.synthetic import SyntheticLoader, SyntheticTokenizer
from llip_scale.data.tokenizer import Tokenizer
from llip_scale.errors import ConfigError
from llip_scale.interop.tokenizers import ClipBpeTokenizer, is_clip_vocabulary

log = logging.getLogger("llip_scale.data")


def tokenizer_from_config(cfg: Config) -> Any:
    """The tokenizer of a run; a ConfigError when it does not fit the text tower."""
    t = cfg.model.text
    if cfg.data.source == "synthetic":
        return SyntheticTokenizer(t.vocab_size, t.context_length, t.eot_id, t.pad_id)
    if not cfg.data.tokenizer and is_clip_vocabulary(t.vocab_size, t.eot_id):
        return ClipBpeTokenizer(None, t.context_length)  # CLIP's vocabulary: its BPE, packaged
    tok = Tokenizer(cfg.data.tokenizer, t.context_length)
    if tok.vocab_size > t.vocab_size or tok.eot_id != t.eot_id:
        raise ConfigError(f"tokenizer {cfg.data.tokenizer} has vocab_size={tok.vocab_size}, eot_id={tok.eot_id} but "
                          f"the model has model.text.vocab_size={t.vocab_size}, model.text.eot_id={t.eot_id}; "
                          "make them match")
    return tok


def check_data(cfg: Config) -> None:
    """Fail before any compute when the data cannot be read."""
    if cfg.data.source == "webdataset":
        check_sources(cfg.data)


def build_loader(cfg: Config, env: Any, tokenizer: Any, split: str = "train") -> Any:
    """The loader of this rank: ``train`` (its share of the global batch) or ``heldout``."""
    batch = local_batch_size(cfg, env.world_size) if split == "train" else cfg.eval.batch_size
    kw = dict(batch_size=batch, rank=env.rank, world_size=env.world_size,
              image_size=cfg.model.vision.image_size, tokenizer=tokenizer, seed=cfg.seed)
    if cfg.data.source == "synthetic":
        return SyntheticLoader(cfg.data, split=split, **kw)
    # Held-out pairs are read once, never resumed: their streams fit the eval batch (auto).
    data_cfg = cfg.data if split == "train" else replace(cfg.data, shards=cfg.eval.heldout_shards, streams=0)
    loader = build_train_loader(data_cfg, **kw)
    if split == "train" and env.rank == 0 and loader.workers < cfg.data.workers:
        log.warning("data: %d streams over %d ranks leave %d per rank, so only %d of data.workers=%d run; raise "
                    "data.streams (a multiple of %d ranks x %d workers) to use them all", loader.n_streams,
                    env.world_size, len(loader.owned), loader.workers, cfg.data.workers, env.world_size,
                    cfg.data.workers)
    return loader
