"""Build a model under DeepSpeed ZeRO-3 ``zero.Init``, so no rank ever holds the whole model.

Flow: DeepSpeed config (``zero_optimization.stage`` = 3) -> ``deepspeed.zero.Init(dtype)`` ->
the model's constructors run; each module's own parameters are created in ``dtype``,
broadcast from rank 0 and partitioned over the data-parallel ranks as soon as that module's
``__init__`` returns, so at most one module's parameters are whole at a time.

A parent that re-initialises a child's parameters after the child was built (the towers'
CLIP-style init of every block's Linear layers, the token embedding, the text projection)
would write into an already partitioned, empty placeholder and be silently lost. While the
model is built, ``torch.nn.init`` functions called on a partitioned parameter therefore gather
that one parameter, run on every rank (rank 0's values win) and re-partition it: the result is
the same model, value for value, as a plain ``build_model`` with the same seed.

This module imports deepspeed; the model code never does.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.runtime.zero.partition_parameters import Init, ZeroParamStatus

from llip_scale.model import ContrastiveModel, ModelConfig, build_model

# torch.nn.init functions that write a tensor in place (the ones model code calls).
_INIT_FUNCTIONS = ("normal_", "zeros_", "ones_", "uniform_", "constant_", "trunc_normal_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "eye_")


def _gathering(fn: Callable[..., Any]) -> Callable[..., Any]:

    @functools.wraps(fn)
    def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if getattr(tensor, "ds_status", None) != ZeroParamStatus.NOT_AVAILABLE:
            return fn(tensor, *args, **kwargs)
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
            return fn(tensor, *args, **kwargs)

    return init


@contextlib.contextmanager
def _inits_gather_partitioned() -> Iterator[None]:
    originals = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name, fn in originals.items():
            setattr(torch.nn.init, name, _gathering(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.nn.init, name, fn)


@contextlib.contextmanager
def _scalar_parameters_supported() -> Iterator[None]:
    """zero.Init broadcasts each new parameter viewed as bytes (``param.data.view(uint8)``),
    which fails for 0-dim parameters such as logit_scale; broadcast those as one element."""

    original = Init._zero_init_param

    def zero_init_param(self: Any, param: torch.nn.Parameter) -> None:
        if param.dim() > 0:
            return original(self, param)
        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        src = 0 if dist.get_world_group() == group else dist.get_global_rank(group, 0)
        dist.broadcast(param.data.reshape(1).view(torch.uint8), src, group)
        param.partition()

    Init._zero_init_param = zero_init_param
    try:
        yield
    finally:
        Init._zero_init_param = original


def _with_dtype(ds_config: dict, dtype: torch.dtype) -> dict:
    """The config with its precision flags saying ``dtype``: zero.Init takes the parameter
    dtype from them (an explicit ``dtype`` argument is ignored on accelerators without fp16)."""
    out = dict(ds_config)
    for key, wanted in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out[key] = {**(ds_config.get(key) or {}), "enabled": dtype == wanted}
    return out


def check_zero3_config(ds_config: dict) -> None:
    stage = (ds_config.get("zero_optimization") or {}).get("stage")
    if stage != 3:
        raise ValueError(f"build_model_zero3 needs a DeepSpeed config with zero_optimization.stage=3, "
                         f"got stage={stage!r}; set distributed.zero_stage=3")


def build_model_zero3(model_cfg: ModelConfig, dtype: torch.dtype, ds_config: dict, backend: str = "auto",
                      chunk_size: Optional[int] = None) -> ContrastiveModel:
    """The model of ``model_cfg``, its parameters in ``dtype`` and partitioned by ZeRO-3.

    Needs torch.distributed initialised (``deepspeed.init_distributed``). Each parameter
    holds its local shard in ``p.ds_tensor``; ``deepspeed.initialize`` takes the model as is.
    Parameter offload to CPU follows ``zero_optimization.offload_param`` of ``ds_config``.
    """

    check_zero3_config(ds_config)
    offload = (ds_config["zero_optimization"].get("offload_param") or {}).get("device", "none")
    remote = "cpu" if offload == "cpu" else None
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    with _scalar_parameters_supported(), _inits_gather_partitioned(), _default_dtype(dtype), \
            deepspeed.zero.Init(config_dict_or_path=_with_dtype(ds_config, dtype), remote_device=remote):
        return build_model(model_cfg, backend, chunk_size)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in ``dtype``: zero.Init would otherwise draw each one in
    fp32 and cast it, a transient of twice the largest module in bf16."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
