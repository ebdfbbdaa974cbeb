"""Evaluation while training: what ``llip-train`` runs every ``eval.every`` steps and at the end.

Flow: the held-out pairs named by the config (:func:`llip_scale.eval.heldout.heldout_source`)
-> loss and recall@1 (:mod:`llip_scale.eval.heldout`); the zero-shot and retrieval folders, when
set -> accuracy and recall (:mod:`llip_scale.eval.run`); the mixing picture of a few retrieval
images -> TensorBoard. Every rank runs each part (ZeRO-3 gathers parameters collectively).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from llip_scale.config import Config
from llip_scale.data.build import build_loader
from llip_scale.errors import ConfigError
from llip_scale.eval.heldout import evaluate_heldout, folder_pairs, heldout_source
from llip_scale.eval.mixing import retrieval_figures
from llip_scale.eval.run import evaluate as evaluate_folders
from llip_scale.train.engine import compute_dtype


def evaluate_run(engine: Any, cfg: Config, env: Any, tokenizer: Any) -> dict[str, float]:
    """Evaluation every ``eval.every`` steps and at the end: the held-out loss and recall of
    :mod:`llip_scale.eval.heldout`, and zero-shot / retrieval on the eval folders when they are set.
    Every rank runs it (ZeRO-3 gathers parameters collectively); rank 0 reports it."""
    out: dict[str, float] = {}
    source, samples = heldout_source(cfg), cfg.eval.heldout_samples
    if source != "none" and samples < env.world_size:
        raise ConfigError(f"eval.heldout_samples={samples} is fewer than the {env.world_size} ranks; "
                          "raise it or set it to 0")
    if source in ("synthetic", "shards"):
        out.update(evaluate_heldout(engine.module, iter(build_loader(cfg, env, tokenizer, "heldout")), cfg, env))
    elif source == "folder":
        per_rank, batches = folder_pairs(cfg.eval.retrieval_dir, tokenizer, cfg.model.vision.image_size, samples,
                                         cfg.eval.batch_size, env)
        out.update(evaluate_heldout(engine.module, batches, cfg, env, per_rank))
    if cfg.eval.zeroshot_dir or cfg.eval.retrieval_dir:
        with eval_cast(cfg, env):
            out.update(evaluate_folders(engine.module, tokenizer, cfg.model.vision.image_size, env.device,
                                        zeroshot_dir=cfg.eval.zeroshot_dir, retrieval_dir=cfg.eval.retrieval_dir,
                                        batch_size=cfg.eval.batch_size))
    return out


def eval_cast(cfg: Config, env: Any) -> Any:
    """Autocast to the training precision for evaluation (nothing in fp32)."""
    dtype = compute_dtype(cfg)
    return torch.autocast(env.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def log_mixing(engine: Any, cfg: Config, env: Any, tokenizer: Any, writer: Any, step: int) -> None:
    """The mixing picture of ``eval.mixing_images`` retrieval images, to TensorBoard (Llip only).
    Every rank encodes (ZeRO-3 gathers parameters collectively); rank 0 draws."""
    model = engine.module
    if not (cfg.eval.mixing_images and cfg.eval.retrieval_dir and model.is_llip and cfg.logging.tensorboard):
        return
    was_training = model.training
    model.eval()
    try:
        with eval_cast(cfg, env):
            figures = retrieval_figures(model, tokenizer, cfg.eval.retrieval_dir, cfg.model.vision.image_size,
                                        env.device, cfg.eval.mixing_images, render=env.is_main)
    finally:
        model.train(was_training)
    for i, figure in enumerate(figures):
        writer.figure(f"eval/mixing/{i}", figure, step)
