"""Build a model under DeepSpeed ZeRO-3 ``zero.Init``, so no rank ever holds the whole model.

Flow: DeepSpeed config (``zero_optimization.stage`` = 3) -> ``deepspeed.zero.Init(dtype)`` ->
the model's constructors run; each module's own parameters are created in ``dtype``,
broadcast from rank 0 and partitioned over the data-parallel ranks as soon as that module's
``__init__`` returns, so at most one module's parameters are whole at a time.

Nothing here patches DeepSpeed: the model code draws every initial value in the constructor of
the module that owns it (no parent re-initialises a child, which under zero.Init would write
into an already partitioned placeholder), and has no 0-dim parameter (which zero.Init's byte-view
broadcast cannot take). So the result is the same model, value for value, as a plain
``build_model`` with the same seed.

This module imports deepspeed; the model code never does.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import deepspeed
import torch

from llip_scale.model import ContrastiveModel, ModelConfig, build_model


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
    with _default_dtype(dtype), \
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
