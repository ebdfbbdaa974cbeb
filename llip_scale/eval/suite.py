"""Benchmark suite: one model over several evaluation sets in their native layouts.

``NAME=ROOT`` specs -> every set read and checked first (:mod:`llip_scale.eval.datasets`; a bad
one fails before the model runs) -> per set, the text side first:
  classification: class names x templates -> one Llip query/target per class;
  retrieval: every caption -> its query/target;
-> image batches decoded by DataLoader workers -> vision tower -> each batch scored at once
against all texts through the model's pair backend (per-class mixing: every image against every
class query), keeping only the [N_images, N_texts] scores (a progress line with images/s) ->
top-1 / top-5, or R@1/5/10 both ways -> one row per set -> a report (the model and protocol
named) as JSON and a Markdown table, rewritten after every set so that a later failure loses
nothing already computed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from llip_scale.eval.datasets import Benchmark, BenchmarkImages, Classification, DatasetError, Retrieval, load_benchmark
from llip_scale.eval.encode import Features, encode_texts
from llip_scale.eval.retrieval import recall_at_k
from llip_scale.eval.zeroshot import class_features, topk_accuracy
from llip_scale.pairs import resolve_backend
from llip_scale.scale.planning import block_activation_elements

Tokenize = Callable[[list[str]], Tensor]
RECALL_KS = (1, 5, 10)


class EvalProgress:
    """``label: done/total images, N images/s`` on one line (rewritten in place on a terminal)."""

    def __init__(self, label: str, total: int, stream: Optional[TextIO] = None, every: Optional[float] = None):
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = every if every is not None else (1.0 if self.tty else 10.0)  # a log file gets fewer lines
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            line = f"{self.label}: {self.done}/{self.total} images, {self.rate:.1f} images/s"
            self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _check(errors: Sequence[str]) -> None:
    bad = [e for e in errors if e]
    if bad:
        raise DatasetError(f"{bad[0]}{f' (and {len(bad) - 1} more in this batch)' if len(bad) > 1 else ''}")


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time the kernels, not their launch
    return time.perf_counter()


@torch.no_grad()
def stream_scores(model, bench: Benchmark, text_features: Features, image_size: int, device: torch.device,
                  batch_size: int, workers: int = 0, stream: Optional[TextIO] = None
                  ) -> tuple[Tensor, dict[str, float]]:
    """Scores [N_images, N_texts]: image batches from the DataLoader workers are encoded and at
    once scored against all texts through the pair head, so only the scores are kept. Timings:
    wall, vision tower, scoring (the per-text mixing) and images/s."""
    loader = DataLoader(BenchmarkImages(bench.source, image_size), batch_size=batch_size, num_workers=workers)
    text = tuple(f.to(device) for f in text_features)
    progress = EvalProgress(bench.name, len(bench.source), stream)
    rows, vision, mixing = [], 0.0, 0.0
    start = _clock(device)
    try:
        for images, errors in loader:
            _check(errors)
            t0 = _clock(device)
            feats = model.encode_image(images.to(device))
            t1 = _clock(device)
            rows.append(model.score(feats, text).float().cpu())
            t2 = _clock(device)
            vision, mixing = vision + t1 - t0, mixing + t2 - t1
            progress.update(len(images))
    finally:
        progress.close()
    wall = _clock(device) - start
    return torch.cat(rows), {"images_wall": wall, "vision": vision, "scores": mixing,
                             "images_per_s": len(bench.source) / max(wall, 1e-9)}


def _timed(fn: Callable, seconds: dict, key: str):
    start = time.perf_counter()
    out = fn()
    seconds[key] = time.perf_counter() - start
    return out


def classification_scores(model, tokenize: Tokenize, bench: Classification, image_size: int, device: torch.device,
                          batch_size: int, workers: int = 0, stream: Optional[TextIO] = None
                          ) -> tuple[Tensor, dict[str, float]]:
    """Scores [N_images, N_classes]: each image mixed for each class through the pair head."""
    seconds: dict[str, float] = {}
    classes = _timed(lambda: class_features(model, bench.classnames, bench.templates, tokenize, device),
                     seconds, "classes")
    scores, timing = stream_scores(model, bench, classes, image_size, device, batch_size, workers, stream)
    return scores, {**timing, **seconds}


def retrieval_scores(model, tokenize: Tokenize, bench: Retrieval, image_size: int, device: torch.device,
                     batch_size: int, workers: int = 0, stream: Optional[TextIO] = None
                     ) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Scores [N_images, N_captions], the image of each caption, and the timings."""
    captions = [c for caps in bench.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(bench.captions) for _ in caps])
    seconds: dict[str, float] = {}
    texts = _timed(lambda: encode_texts(model, tokenize(captions), device), seconds, "captions")
    scores, timing = stream_scores(model, bench, texts, image_size, device, batch_size, workers, stream)
    return scores, owner, {**timing, **seconds}


def evaluate_benchmark(model, tokenize: Tokenize, bench: Benchmark, image_size: int, device: torch.device,
                       batch_size: int, workers: int = 0, stream: Optional[TextIO] = None) -> dict:
    """One row of the report."""
    row = {"dataset": bench.name, "root": str(bench.root), "images": len(bench.source)}
    if isinstance(bench, Classification):
        scores, seconds = classification_scores(model, tokenize, bench, image_size, device, batch_size, workers,
                                                stream)
        row.update(task="zero-shot classification", classes=len(bench.classnames), templates=len(bench.templates))
        row.update(topk_accuracy(scores, torch.tensor(bench.labels)))
    else:
        scores, owner, seconds = retrieval_scores(model, tokenize, bench, image_size, device, batch_size, workers,
                                                  stream)
        row.update(task="retrieval", captions=len(owner))
        row.update(recall_at_k(scores, owner, RECALL_KS))
    row["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
    return row


def load_benchmarks(specs: Sequence[tuple[str, str | Path]]) -> list[Benchmark]:
    """Every set read and checked before any compute."""
    return [load_benchmark(name, root) for name, root in specs]


def run_suite(model, tokenize: Tokenize, benches: Sequence[Benchmark], image_size: int, device: torch.device,
              batch_size: int, workers: int = 0, stream: Optional[TextIO] = None,
              on_row: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """One row per set; ``on_row`` sees the rows so far after each set. The model is put in eval
    mode and restored."""
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    try:
        for bench in benches:
            rows.append(evaluate_benchmark(model, tokenize, bench, image_size, device, batch_size, workers, stream))
            if on_row is not None:
                on_row(rows)
    finally:
        model.train(was_training)
    return rows


# ---------------------------------------------------------------------------------------------
# Report: the model, the protocol, one row per set
# ---------------------------------------------------------------------------------------------

def describe_model(model, source: str) -> dict:
    """Name, head and sizes of a ContrastiveModel (what the table's caption says)."""
    cfg = model.cfg
    v, h = cfg.vision, cfg.head
    out = {"source": source, "name": cfg.name, "head": h.kind, "image_size": v.image_size,
           "patch_size": v.patch_size, "embed_dim": h.embed_dim,
           "parameters": sum(p.numel() for p in model.parameters())}
    if h.kind == "llip":
        out.update(num_tokens=v.num_tokens, num_heads=h.num_heads, tau=h.tau)
    return out


def protocol(model, device: torch.device) -> dict:
    """What the numbers mean: the zero-shot and retrieval protocols, the scoring and the images."""

    llip = model.cfg.head.kind == "llip"
    return {
        "zero-shot": ("per-class mixing: the class query is the mean of its prompts' queries, the target the "
                      "renormalised mean of their unit targets; every image is mixed for every class"
                      if llip else "class embedding = renormalised mean of the prompt embeddings"),
        "retrieval": ("every image mixed for every caption (pair-head scores); R@k both ways, an image is a hit "
                      "if any of its captions is in its top k" if llip else
                      "cosine scores; R@k both ways, an image is a hit if any of its captions is in its top k"),
        "scores": (f"pair backend {resolve_backend(model.head.backend, device)}" if llip
                   else "dot products of unit vectors"),
        "images": (f"resize the short side to {model.cfg.vision.image_size} (bicubic), center crop, "
                   "OpenAI CLIP mean/std"),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def to_markdown(report: dict) -> str:
    m = report["model"]
    head = m["head"] + (f", K={m['num_tokens']}, H={m['num_heads']}, tau={m['tau']:g}" if m["head"] == "llip" else "")
    lines = [f"# {m['name']} ({head}, {m['parameters'] / 1e6:.1f}M parameters, {m['image_size']} px)", "",
             f"Model: `{m['source']}`", ""]
    lines += [f"- {k}: {v}" for k, v in report["protocol"].items()]
    cls = [r for r in report["results"] if r["task"] == "zero-shot classification"]
    ret = [r for r in report["results"] if r["task"] == "retrieval"]
    if cls:
        lines += ["", "## Zero-shot classification (accuracy, %)", "",
                  "| dataset | classes | images | templates | top-1 | top-5 |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['dataset']} | {r['classes']} | {r['images']} | {r['templates']} | {_pct(r['top1'])} "
                  f"| {_pct(r['top5'])} |" for r in cls]
    if ret:
        lines += ["", "## Retrieval (recall, %)", "",
                  "| dataset | images | captions | image→text R@1 | R@5 | R@10 | text→image R@1 | R@5 | R@10 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ret:
            cells = [_pct(r[f"{d}_R@{k}"]) for d in ("image_to_text", "text_to_image") for k in RECALL_KS]
            lines.append(f"| {r['dataset']} | {r['images']} | {r['captions']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, json_path: Optional[str | Path], markdown_path: Optional[str | Path]) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    if markdown_path:
        Path(markdown_path).write_text(to_markdown(report))


# ---------------------------------------------------------------------------------------------
# Batch size from the memory at hand
# ---------------------------------------------------------------------------------------------

def available_bytes(device: torch.device) -> float:
    """Free memory of ``device`` (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def image_batch_bytes(cfg, workers: int) -> float:
    """Bytes per image of one evaluation batch: the vision tower's largest block working set in
    fp32 (attention scores included, in case attention is not fused), the decoded inputs held by
    the workers' prefetch, and the image's keys/values."""

    v = cfg.vision
    tokens = v.grid ** 2 + v.num_tokens
    block = block_activation_elements(tokens, v.width, v.mlp_dim, v.activation) + v.heads * tokens * tokens
    inputs = 3 * v.image_size ** 2 * (2 * workers + 2)  # prefetch_factor 2 per worker, plus the batch in use
    return 4.0 * (block + inputs + 2 * v.num_tokens * cfg.head.embed_dim)


def auto_batch_size(cfg, device: torch.device, workers: int, fraction: float = 0.25, cap: int = 512) -> int:
    """The largest batch whose working set fits in ``fraction`` of the free memory (1..cap)."""
    return int(max(1, min(cap, fraction * available_bytes(device) // image_batch_bytes(cfg, workers))))
