"""Memory of real training steps on the CPU, to check the planner (:mod:`llip_scale.scale.planning`).

Flow: a warm-up on a miniature of the model (one-time allocations) -> the resident high-water
mark reset (Linux: /proc/self/clear_refs) -> ``steps`` real fp32 steps (forward, backward,
AdamW) of the model -> the high-water mark above the baseline, next to :func:`cpu_plan`, the
plan of exactly that run.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import resource
import sys
from typing import Optional

import torch

from llip_scale.config import Config
from llip_scale.model import build_model
from llip_scale.model.config import ModelConfig
from llip_scale.scale.planning import MemoryPlan, plan_memory


def status_bytes(field_name: str) -> Optional[float]:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in bytes (None off Linux)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field_name + ":"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> float:
    """Reset the resident high-water mark; return the current resident bytes (the baseline).

    Without the reset, memory freed after a higher earlier peak (imports, the warm-up) would
    absorb part of the step unseen. Linux resets VmHWM on writing 5 to /proc/self/clear_refs;
    elsewhere fall back to getrusage's maximum, which cannot be reset.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_bytes("VmRSS")
    except OSError:
        return max_rss_bytes()


def peak_bytes() -> float:
    """The resident high-water mark in bytes (since the last :func:`reset_peak`)."""
    return status_bytes("VmHWM") or max_rss_bytes()


def max_rss_bytes() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss) if sys.platform == "darwin" else float(rss) * 1024  # Linux reports KiB


def measure_step_memory(cfg: Config, micro_batch: int, steps: int = 2, backend: Optional[str] = None,
                        warmup: bool = True) -> dict:
    """Peak resident memory of real fp32 training steps on the CPU, above the baseline.

    Runs ``steps`` x (forward, backward, AdamW step, zero_grad) of ``cfg.model`` at batch
    ``micro_batch`` in this process after a warm-up, and reports the resident high-water mark
    above the resident memory before the steps. Best in a fresh process with glibc's mmap
    threshold pinned (``tools/plan_memory.py --measure`` does both), so freed tensors leave the
    resident set and the peak is that of live memory.
    """

    torch.manual_seed(cfg.seed)
    backend = backend or cfg.loss.backend
    if warmup:  # a miniature of the same model first: the first checkpointed call alone
        _train_steps(_miniature(cfg.model), cfg, 2, 1, backend)  # imports ~150 MB of modules
    gc.collect()
    baseline = reset_peak()
    losses = _train_steps(cfg.model, cfg, micro_batch, steps, backend)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss while measuring: {losses}")
    return {"peak_bytes": peak_bytes() - baseline, "baseline_bytes": baseline, "losses": losses,
            "micro_batch": micro_batch, "steps": steps}


def _miniature(m: ModelConfig) -> ModelConfig:
    v = dataclasses.replace(m.vision, image_size=2 * m.vision.patch_size, width=8, depth=1, heads=1, mlp_dim=8)
    t = dataclasses.replace(m.text, width=8, depth=1, heads=1, mlp_dim=8)
    h = dataclasses.replace(m.head, embed_dim=8 * m.head.num_heads)
    return dataclasses.replace(m, vision=v, text=t, head=h)


def _train_steps(m: ModelConfig, cfg: Config, batch: int, steps: int, backend: str) -> list[float]:
    """``steps`` real training steps of model ``m`` on random data; the losses."""

    model = build_model(m, backend, cfg.loss.chunk_size)
    model.visual.transformer.grad_checkpointing = cfg.distributed.activation_checkpointing
    model.text.transformer.grad_checkpointing = cfg.distributed.activation_checkpointing
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay)
    images = torch.randn(batch, 3, m.vision.image_size, m.vision.image_size)
    tokens = torch.randint(3, m.text.vocab_size, (batch, m.text.context_length))
    tokens[:, m.text.context_length // 2] = m.text.eot_id
    losses = []
    for _ in range(steps):
        loss = model(images, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def cpu_plan(cfg: Config, micro_batch: int, backend: Optional[str] = None) -> MemoryPlan:
    """The plan of what ``measure_step_memory`` runs: one process, no ZeRO, fp32, torch AdamW."""
    local = dataclasses.replace(cfg, distributed=dataclasses.replace(
        cfg.distributed, zero_stage=0, precision="fp32", offload_optimizer=False, offload_params=False,
        deepspeed={}))
    return plan_memory(local, 1, micro_batch, backend or _cpu_backend(cfg.loss.backend), reserve_bytes=0.0,
                       optimizer_transient=True)


def _cpu_backend(backend: str) -> str:
    return "chunked" if backend in ("auto", "triton") else backend
