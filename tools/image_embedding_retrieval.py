#!/usr/bin/env python
"""How good is Llip's caption-independent image embedding? Retrieval and zero-shot with the
per-caption scores of the pair head against one vector per image, as a Markdown table.

    python tools/image_embedding_retrieval.py runs/demo --eval data/demo/eval \
        --out benchmarks/IMAGE_EMBEDDING.md

PATH (run folder, checkpoint or export) -> the model and its tokenizer -> the eval folder's
images encoded once (keys, values) and its captions / class prompts once (queries, targets) ->
scores three ways:

* per caption: the pair head (every image mixed for every caption), what training optimises;
* uniform: ``model.image_embedding(images)`` (values mixed with weights 1/K, then W_o) against
  the normalised targets (``model.text_embedding``);
* mean query: ``model.image_embedding(images, query=q)`` with ``q`` the mean query of the
  split's captions (one "average caption" for every image), against the same targets;

-> Recall@1/5 both ways and zero-shot top-1/top-5 for each; for the two embeddings also
image-to-image kNN on the zero-shot images (leave-one-out, 10 neighbours by cosine, majority
label), which the per-caption scores cannot do.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llip_scale.eval.encode import encode_images, encode_texts, score_all
from llip_scale.eval.evalsets import load_retrieval_split, load_zeroshot_split
from llip_scale.eval.retrieval import recall_at_k
from llip_scale.eval.run import _image_batches
from llip_scale.eval.zeroshot import class_features, topk_accuracy
from llip_scale.interop.factory import create_model, get_tokenizer

METRICS = ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5", "zeroshot_top1",
           "zeroshot_top5", "knn_top1")
NEIGHBOURS = 10


def knn_top1(embeddings: torch.Tensor, labels: torch.Tensor, k: int = NEIGHBOURS) -> float:
    """Leave-one-out kNN accuracy: the majority label of each image's k most similar others."""
    sims = embeddings @ embeddings.t()
    sims.fill_diagonal_(float("-inf"))
    votes = labels[sims.topk(k, dim=1).indices]  # [N, k]
    counts = torch.zeros(len(labels), int(labels.max()) + 1).scatter_add_(1, votes, torch.ones_like(votes, dtype=torch.float))
    return (counts.argmax(dim=1) == labels).float().mean().item()


def _embedding_scores(model, image_feats, text_feats, query) -> torch.Tensor:
    with torch.no_grad():
        images = model.image_embedding(image_feats, query=query)
        return images @ F.normalize(text_feats[-1], dim=-1).t()


def measure(model, tokenize, folder: Path) -> dict[str, dict[str, float]]:
    """Metrics per scoring method on a demo-layout eval folder."""
    size, device = model.cfg.vision.image_size, torch.device("cpu")
    rt, zs = load_retrieval_split(folder), load_zeroshot_split(folder)
    rt_images = encode_images(model, _image_batches(rt.images, size, 64, 0), device)
    captions = [c for caps in rt.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(rt.captions) for _ in caps])
    rt_texts = encode_texts(model, tokenize(captions), device)
    zs_images = encode_images(model, _image_batches(zs.images, size, 64, 0), device)
    classes = class_features(model, zs.classnames, zs.templates, tokenize, device)
    labels = torch.tensor(zs.labels)
    mean_query = rt_texts[0].mean(0)
    methods = {
        "per caption (pair head)": lambda img, txt: score_all(model, img, txt, device),
        "uniform mixing": lambda img, txt: _embedding_scores(model, img, txt, None),
        "mean-query mixing": lambda img, txt: _embedding_scores(model, img, txt, mean_query),
    }
    queries = {"uniform mixing": None, "mean-query mixing": mean_query}
    out = {}
    for name, score in methods.items():
        row = {k: v for k, v in recall_at_k(score(rt_images, rt_texts), owner).items() if k in METRICS}
        row.update({f"zeroshot_{k}": v for k, v in topk_accuracy(score(zs_images, classes), labels).items()})
        if name in queries:
            with torch.no_grad():
                row["knn_top1"] = knn_top1(model.image_embedding(zs_images, query=queries[name]), labels)
        out[name] = row
    return out


def markdown(results: dict[str, dict[str, float]], path: str, folder: Path, seconds: float) -> str:
    head = "| scores | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[m]:.1f}" if m in row else "-" for m in METRICS) + " |")
    return "\n".join(lines) + f"\n\nModel: `{path}`; eval folder: `{folder}`; {seconds:.0f} s on the CPU.\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="run folder, checkpoint folder or export")
    p.add_argument("--eval", type=Path, required=True, help="eval folder (tools/make_demo_data.py layout)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    start = time.time()
    try:
        model = create_model(args.model, backend="chunked")
        tokenize = get_tokenizer(args.model)
        if not model.is_llip:
            raise ValueError(f"the model's head is '{model.cfg.head.kind}': its image embedding is its only score")
        results = measure(model, tokenize, args.eval)
    except (OSError, ValueError) as e:
        print(f"image_embedding_retrieval: {e}", file=sys.stderr)
        return 2
    table = markdown(results, args.model, args.eval, time.time() - start)
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
