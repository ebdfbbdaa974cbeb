"""DeepSpeed: its config, model construction, the engine, and partition-aware helpers.

The one module that imports deepspeed. Flow:

    Config ──> deepspeed_config() (ZeRO stage, precision, clipping; ``distributed.deepspeed``
               deep-merged last) ──> build_run_model() (under stage 3 built inside ``zero.Init``,
               so each rank only ever holds its shard) ──> initialize(): AdamW over
               param_groups() + warmup/cosine LambdaLR ──> DeepSpeedEngine

After every optimizer step :func:`clamp_logit_scale` clamps the logit scale in the optimizer's
fp32 master copy (where ZeRO or mixed precision keeps one) and in the module parameter (under
ZeRO-3, each rank in its own shard). Checkpoint files are read and written by
:mod:`llip_scale.checkpoints`, which takes the engine as it is.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import Tensor, nn

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"  # otherwise DeepSpeed guesses, with a warning

import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.utils import safe_get_full_grad, safe_get_local_fp32_param, safe_set_local_fp32_param

from llip_scale.checkpoints.ds_compat import hp_fragment
from llip_scale.config import Config, deep_merge, local_batch_size
from llip_scale.dist.collectives import DistEnv
from llip_scale.model import ContrastiveModel, build_model
from llip_scale.pairs import resolve_backend
from llip_scale.train.zero_init import build_model_zero3

Engine = deepspeed.DeepSpeedEngine

# DeepSpeed calls torch.distributed functions that torch now marks deprecated, once per call.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
# DeepSpeed logs every save/load at INFO on every rank; our own lines say what matters.
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
deepspeed.utils.logger.setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def compute_dtype(cfg: Config) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.distributed.precision]


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config dict of a run (``distributed.deepspeed`` merged in last)."""
    d = cfg.distributed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out = {
        "train_batch_size": cfg.batch_size,
        # One DeepSpeed micro-batch per step, the whole local batch: gradient accumulation
        # (llip_scale.train.step) splits one loss into several backward passes, which
        # step_optimizer marks with DeepSpeed's accumulation boundary.
        "train_micro_batch_size_per_gpu": local_batch_size(cfg, world_size),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": d.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 62,  # the trainer does its own logging
        "wall_clock_breakdown": False,
    }
    return deep_merge(out, d.deepspeed)


# ---------------------------------------------------------------------------------------------
# model, optimizer, schedule
# ---------------------------------------------------------------------------------------------

def build_run_model(cfg: Config, env: DistEnv, ds_config: dict) -> ContrastiveModel:
    """The model of ``cfg.model`` with the configured pair backend and activation checkpointing,
    partitioned across ranks under ZeRO-3."""

    backend = resolve_backend(cfg.loss.backend, env.device)
    if cfg.distributed.zero_stage == 3:
        # Built under zero.Init: no rank ever holds the whole model, and the result equals the
        # plain model built from the same seed (llip_scale.train.zero_init).
        model = build_model_zero3(cfg.model, compute_dtype(cfg), ds_config, backend, cfg.loss.chunk_size)
    else:
        model = build_model(cfg.model, backend, cfg.loss.chunk_size)
    for tower in (model.visual, model.text):
        tower.transformer.grad_checkpointing = cfg.distributed.activation_checkpointing
    return model


def _shape(p: nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 leaves an empty placeholder in p.shape


def decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay on matrices only: none on gains, biases, logit scale and bias."""
    return len(_shape(param)) >= 2 and not name.endswith(("logit_scale", "logit_bias"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    groups = {True: [], False: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[decays(name, p)].append(p)
    return [{"params": groups[True], "weight_decay": weight_decay, "name": "decay"},
            {"params": groups[False], "weight_decay": 0.0, "name": "no_decay"}]


class WarmupCosine:
    """LR factor of update ``i`` (0-based): linear warmup to 1, then cosine (or constant) down to
    ``min_ratio`` at update ``total``."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0, kind: str = "cosine"):
        self.warmup, self.total, self.min_ratio, self.kind = warmup, total, min_ratio, kind

    def __call__(self, i: int) -> float:
        if i < self.warmup:
            return (i + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (i - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(cfg: Config, groups: list[dict]) -> torch.optim.Optimizer:
    o = cfg.optim
    if cfg.distributed.offload_optimizer:
        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def prebuild_ops() -> list[str]:
    """Build the DeepSpeed ops a run loads at start (on the CPU, the shared-memory communication
    op), so that jobs load them instead of building them: a job killed while building leaves a
    lock behind (see :mod:`llip_scale.train.buildlock`). Returns the names of the ops built or found."""

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return []
    builder.load(verbose=False)
    return [builder.NAME]


def initialize(cfg: Config, env: DistEnv) -> Engine:
    """Model + AdamW + schedule wrapped in a DeepSpeed engine for this rank."""
    # DeepSpeed's own comm layer wraps the process group we already set up (zero.Init reads the
    # world size from it).
    with contextlib.redirect_stdout(io.StringIO()):  # its "op built successfully" line, per rank
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    ds_config = deepspeed_config(cfg, env.world_size)
    schedule = WarmupCosine(cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio, cfg.optim.schedule)
    model = build_run_model(cfg, env, ds_config)
    groups = param_groups(model, cfg.optim.weight_decay)
    # A plain function, not the schedule object: LambdaLR then checkpoints only its position,
    # and the warmup/horizon of a resumed run come from its config.
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=_optimizer(cfg, groups), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: schedule(i)))
    return engine


# ---------------------------------------------------------------------------------------------
# partition-aware helpers
# ---------------------------------------------------------------------------------------------

def _is_zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _gathered(params: list[nn.Parameter], modifier_rank: Optional[int] = None) -> ContextManager:
    if any(_is_zero3(p) for p in params):
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def _clamp_master(p: nn.Parameter, low: float, high: float) -> None:
    """Clamp the optimizer's fp32 copy of ``p`` where one exists (it overwrites p after a step)."""
    if _is_zero3(p):
        local = safe_get_local_fp32_param(p)  # this rank's slice; clamping is element-wise
        if local is not None:
            safe_set_local_fp32_param(p, local.clamp(low, high))
    elif (fragment := hp_fragment(p)) is not None:  # ZeRO-1/2, bf16 optimizer
        fragment.data.clamp_(low, high)


def clamp_logit_scale(engine: Engine) -> tuple[float, float]:
    """Clamp logit_scale to [0, max_logit_scale] in every copy of it; return (scale, bias).

    The clamp is element-wise, so each rank clamps the pieces it holds, with no communication:
    the optimizer's fp32 master (which would otherwise overwrite the module parameter at the
    next step), and under ZeRO-3 its shard of the module parameter. Gathering the parameter
    to edit it on one rank (``GatheredParameters(modifier_rank=0)``) would leave the master
    unclamped. Reading the values for the logs gathers them (a collective under ZeRO-3).
    """
    module: ContrastiveModel = engine.module
    scale, bias = module.head.logit_scale, module.head.logit_bias
    high = module.cfg.head.max_logit_scale
    with torch.no_grad():
        _clamp_master(scale, 0.0, high)
        if _is_zero3(scale):
            scale.ds_tensor.data.clamp_(0.0, high)
        scale.data.clamp_(0.0, high)  # the full tensor where this rank holds one (else empty)
    if bias is None:  # CLIP: InfoNCE has no bias
        with _gathered([scale]):
            return float(scale.detach().float()), 0.0
    with _gathered([scale, bias]):
        return float(scale.detach().float()), float(bias.detach().float())


def step_optimizer(engine: Engine, loss: Tensor, more: Sequence[Callable[[], Tensor]] = ()) -> float:
    """Backward, optimizer step (clipping, schedule); return the global gradient norm.

    ``more``: further backward passes of the same step (gradient accumulation), each a function
    building the scalar to backpropagate once the previous backward is done, so that only one
    pass's activations are alive at a time. The gradients add up; DeepSpeed reduces them over
    ranks at the last pass (its accumulation boundary), and none is scaled by DeepSpeed's
    gradient_accumulation_steps: the passes are parts of one loss, not losses to average.
    """
    if more:
        engine.set_gradient_accumulation_boundary(False)
        engine.backward(loss, scale_wrt_gas=False)
        for i, build in enumerate(more):
            engine.set_gradient_accumulation_boundary(i == len(more) - 1)
            engine.backward(build(), scale_wrt_gas=False)
    else:
        engine.backward(loss)
    norm = None
    if engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        # Plain data parallel in fp32: DeepSpeed does not compute the norm; gradients are
        # already averaged over ranks here, so the local norm is the global one.
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.stack(grads).norm()) if grads else 0.0
    engine.step()
    if norm is None:
        norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def full_gradients(engine: Engine) -> dict[str, Tensor]:
    """Every parameter's full (averaged over ranks) gradient, after backward and before step.
    A collective under ZeRO: all ranks must call it."""
    out = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        if g is not None:
            out[name] = g.detach().float().cpu().clone()
    return out


def full_state_dict(engine: Engine) -> dict[str, Tensor]:
    """Every parameter gathered (a collective under ZeRO-3; all ranks must call it)."""
    out = {}
    for name, p in engine.module.named_parameters():
        with _gathered([p]):
            out[name] = p.detach().float().cpu().clone()
    return out
