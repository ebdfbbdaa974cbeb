"""Evaluation on folders: zero-shot classification and retrieval for one model.

eval folder (``llip_scale.eval.evalsets`` layout) -> images loaded and center-cropped in a
DataLoader -> encoded once -> zero-shot (Llip class protocol) and retrieval scores through the
model's pair head -> a flat dict of metrics ("zeroshot/top1", "retrieval/image_to_text_R@1", ...).
The same code evaluates Llip and the SigLIP / CLIP baselines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from llip_scale.eval.encode import encode_images, encode_texts, score_all
from llip_scale.eval.evalsets import EvalImages, ZeroShotSplit, load_retrieval_split, load_zeroshot_split
from llip_scale.eval.retrieval import recall_at_k
from llip_scale.eval.zeroshot import class_features, zeroshot_eval


def _image_batches(paths: Sequence[Path], image_size: int, batch_size: int, workers: int):
    return DataLoader(EvalImages(paths, image_size), batch_size=batch_size, num_workers=workers)


def evaluate_zeroshot(model, tokenize: Callable[[list[str]], Tensor], folder: str | Path, image_size: int,
                      device: torch.device, batch_size: int = 64, workers: int = 0,
                      taus: Optional[Sequence[float]] = None) -> dict[str, float]:
    split = load_zeroshot_split(folder)
    feats = encode_images(model, _image_batches(split.images, image_size, batch_size, workers), device)
    result = zeroshot_eval(model, feats, torch.tensor(split.labels), split.classnames, split.templates,
                           tokenize, device, taus=taus)
    return {f"zeroshot/{k}": v for k, v in result.items()}


def zeroshot_scores(model, tokenize: Callable[[list[str]], Tensor], folder: str | Path, image_size: int,
                    device: torch.device, batch_size: int = 64) -> tuple[Tensor, ZeroShotSplit]:
    """Scores [N_images, N_classes] of a zero-shot folder (for a look at the predictions), and the split."""
    split = load_zeroshot_split(folder)
    feats = encode_images(model, _image_batches(split.images, image_size, batch_size, 0), device)
    classes = class_features(model, split.classnames, split.templates, tokenize, device)
    return score_all(model, feats, classes, device), split


def evaluate_retrieval(model, tokenize: Callable[[list[str]], Tensor], folder: str | Path, image_size: int,
                       device: torch.device, batch_size: int = 64, workers: int = 0) -> dict[str, float]:
    split = load_retrieval_split(folder)
    images = encode_images(model, _image_batches(split.images, image_size, batch_size, workers), device)
    captions = [c for caps in split.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(split.captions) for _ in caps])
    texts = encode_texts(model, tokenize(captions), device)
    scores = score_all(model, images, texts, device, block=batch_size)
    return {f"retrieval/{k}": v for k, v in recall_at_k(scores, owner).items()}


def evaluate(model, tokenize: Callable[[list[str]], Tensor], image_size: int, device: torch.device, *,
             zeroshot_dir: str = "", retrieval_dir: str = "", batch_size: int = 64, workers: int = 0,
             taus: Optional[Sequence[float]] = None) -> dict[str, float]:
    """Every evaluation whose folder is given; the model is put in eval mode and restored."""
    was_training = model.training
    model.eval()
    try:
        out: dict[str, float] = {}
        if zeroshot_dir:
            out.update(evaluate_zeroshot(model, tokenize, zeroshot_dir, image_size, device, batch_size, workers, taus))
        if retrieval_dir:
            out.update(evaluate_retrieval(model, tokenize, retrieval_dir, image_size, device, batch_size, workers))
        return out
    finally:
        model.train(was_training)
