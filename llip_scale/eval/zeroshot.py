"""Zero-shot classification with the Llip protocol.

class names x prompt templates -> tokenised prompts -> text features; per class, the raw
queries are averaged over the templates and the normalised targets are averaged and
renormalised (baselines: the unit vectors are averaged and renormalised) -> one "text" per class.
Each image is encoded once; every image is scored against every class through the pair head
(so each class gets its own mixture of the image's tokens) -> top-1 / top-5 accuracy.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from llip_scale.eval.encode import Features, encode_texts, score_all


def class_features(model, classnames: Sequence[str], templates: Sequence[str],
                   tokenize: Callable[[list[str]], Tensor], device: torch.device) -> Features:
    """One text feature tuple per class, combined over the templates."""
    if not classnames or not templates:
        raise ValueError("zero-shot evaluation needs at least one class name and one template")
    prompts = [t.replace("{}", c) if "{}" in t else f"{t} {c}" for c in classnames for t in templates]
    feats = encode_texts(model, tokenize(prompts), device)
    n_t = len(templates)
    grouped = [f.view(len(classnames), n_t, -1) for f in feats]
    if len(grouped) == 2:  # Llip: (queries, targets)
        queries = grouped[0].mean(dim=1)
        targets = F.normalize(F.normalize(grouped[1], dim=-1).mean(dim=1), dim=-1)
        return queries, targets
    return (F.normalize(grouped[0].mean(dim=1), dim=-1),)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest scores, for each k."""
    out = {}
    order = scores.argsort(dim=1, descending=True)
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (order[:, :k_eff] == labels[:, None]).any(dim=1)
        out[f"top{k}"] = hit.float().mean().item()
    return out


def zeroshot_eval(model, image_features: Features, labels: Tensor, classnames: Sequence[str],
                  templates: Sequence[str], tokenize: Callable[[list[str]], Tensor], device: torch.device,
                  taus: Optional[Sequence[float]] = None) -> dict[str, float]:
    """Top-1/top-5 accuracy; with ``taus``, also the accuracy at each mixing temperature."""
    cls = class_features(model, classnames, templates, tokenize, device)
    result = topk_accuracy(score_all(model, image_features, cls, device), labels)
    for tau in taus or ():
        acc = topk_accuracy(score_all(model, image_features, cls, device, tau=tau), labels)
        result.update({f"{k}@tau={tau:g}": v for k, v in acc.items()})
    return result
