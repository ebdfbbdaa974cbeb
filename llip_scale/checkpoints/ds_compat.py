"""What we read of DeepSpeed beyond its public API: checkpoint file layouts, and the private
engine and parameter attributes a resume on another world size and the logit-scale clamp touch.

Everything here depends on how DeepSpeed (0.19) lays out a checkpoint folder or keeps its ZeRO
state, and on nothing else of this project: file names, dictionary keys, and the few private
engine attributes a resharded load reads and sets (``_param_slice_mappings``, ``_hp_mapping``).
tests/test_ds_compat.py checks each private read on a live engine; tests/test_reshard.py checks
each function end to end:
the readers against DeepSpeed's own consolidation of the fp32 weights, the engine functions by
resumes that must reproduce the saved state bit for bit, read back through DeepSpeed's public
getters; a DeepSpeed upgrade that moves one of them fails there.

    folder ──> layout() ──> "whole" | "zero3" | "zero12" | "bf16"
    zero_pp_rank_R_mp_rank_00_optim_states.pt ──(mmap)──> read_zero3_partition() (stage 3)
                                              ──(mmap)──> read_zero12_partition() (stages 1, 2)
    model states file ──(mmap)──> read_model_states() ──> lr scheduler, engine counters, and at
                                  stages 0-2 the module's weights (load_module_weights)
    a new rank's partition (built by llip_scale.checkpoints.reshard) ──> load_zero3_partition(engine)
                                                              ──> load_zero12_partition(engine)

This module does not import deepspeed (unpickling a checkpoint file imports the DeepSpeed
classes it names, e.g. the loss scaler).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

# The flat optimizer states of a ZeRO partition: Adam's two moments next to the fp32 master.
MOMENTS = ("exp_avg", "exp_avg_sq")
_ZERO_OPTIM = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def zero3_optim_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def model_states_file(zero_stage: int) -> str:
    """The model states file every rank of any world can read: rank 0's (ZeRO-3 writes one per
    rank, all with the same scheduler and counters; other stages write one, on rank 0)."""
    return "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"


def layout(names: Iterable[str], zero_stage: int) -> str:
    """How a checkpoint folder holding files ``names`` keeps the optimizer state:

    * ``whole``: in one file that every rank loads (stage 0 in fp32 or fp16);
    * ``zero3``: one flat partition per rank, each parameter split evenly (stage 3);
    * ``zero12``: one flat partition per rank of each parameter group, which DeepSpeed pads
      (stages 1 and 2);
    * ``bf16``: the partitions of the bf16 optimizer DeepSpeed uses at stage 0 (not resharded).
    """
    names = list(names)
    if any(n.startswith("bf16_zero_pp_rank_") for n in names):
        return "bf16"
    if not any(_ZERO_OPTIM.match(n) for n in names):
        return "whole"
    return "zero3" if zero_stage == 3 else "zero12"


def _load(path: Path) -> dict:
    """A DeepSpeed file, memory-mapped: tensors are read from disk only where they are sliced."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def read_model_states(folder: Path, zero_stage: int) -> dict:
    return _load(Path(folder) / model_states_file(zero_stage))


def zero3_param_shapes(model_states: dict) -> list[dict[str, torch.Size]]:
    """Per ZeRO-3 sub-group, parameter name -> full shape, in the order of the flat partitions."""
    return [dict(group) for group in model_states["param_shapes"]]


@dataclass
class Zero3Partition:
    """One rank's share of a ZeRO-3 optimizer: per sub-group, its flat fp32 master weights and
    Adam moments (views into a memory-mapped file), plus what is the same on every rank."""
    flat: list[dict[str, torch.Tensor]]  # sub-group -> {"fp32", "exp_avg", "exp_avg_sq"}
    steps: list[Any]  # sub-group -> the optimizer's step count (a tensor for torch's AdamW)
    common: dict  # the optimizer dict without its per-rank tensors: loss scaler, param groups, ...


def read_zero3_partition(folder: Path, rank: int) -> Zero3Partition:
    sd = _load(Path(folder) / zero3_optim_file(rank))["optimizer_state_dict"]
    state = sd["optimizer_state_dict"]["state"]
    groups = range(len(sd["fp32_flat_groups"]))
    flat = [{"fp32": sd["fp32_flat_groups"][i], **{k: state[i][k] for k in MOMENTS}} for i in groups]
    common = {k: v for k, v in sd.items() if k not in ("fp32_flat_groups", "optimizer_state_dict")}
    common["param_groups"] = sd["optimizer_state_dict"]["param_groups"]
    return Zero3Partition(flat, [state[i]["step"] for i in groups], common)


def zero3_state_dict(partition: Zero3Partition, world_size: int) -> dict:
    """The optimizer state dict DeepSpeed's ZeRO-3 optimizer writes for one rank (and loads)."""
    state = {i: {"step": step.clone() if torch.is_tensor(step) else step,
                 **{k: partition.flat[i][k] for k in MOMENTS}} for i, step in enumerate(partition.steps)}
    out = {k: v for k, v in partition.common.items() if k != "param_groups"}
    out.update(partition_count=world_size, fp32_flat_groups=[g["fp32"] for g in partition.flat],
               optimizer_state_dict={"state": state, "param_groups": partition.common["param_groups"]})
    return out


@dataclass
class Zero12Partition:
    """One rank's share of a ZeRO-1/2 optimizer: per parameter group, its flat fp32 master and
    moments, and where each parameter's fragment lies in them (name -> (start, numel))."""
    flat: list[dict[str, torch.Tensor]]
    fragments: list[dict[str, tuple[int, int]]]
    steps: list[Any]
    common: dict


def read_zero12_partition(folder: Path, rank: int) -> Zero12Partition:
    sd = _load(Path(folder) / zero3_optim_file(rank))["optimizer_state_dict"]
    base = sd["base_optimizer_state"]
    groups = range(len(sd["single_partition_of_fp32_groups"]))
    flat = [{"fp32": sd["single_partition_of_fp32_groups"][i], **{k: base["state"][i][k] for k in MOMENTS}}
            for i in groups]
    fragments = [{name: (int(a.start), int(a.numel)) for name, a in sd["param_slice_mappings"][i].items()}
                 for i in groups]
    common = {k: v for k, v in sd.items() if k not in ("single_partition_of_fp32_groups", "base_optimizer_state")}
    common["param_groups"] = base["param_groups"]
    return Zero12Partition(flat, fragments, [base["state"][i]["step"] for i in groups], common)


def zero12_state_dict(engine: Any, partition: Zero12Partition) -> dict:
    """The optimizer state dict DeepSpeed's ZeRO-1/2 optimizer of ``engine`` writes (and
    loads), holding ``partition``: the padding and slice mappings are the engine's own."""
    opt = engine.optimizer
    state = {i: {"step": step.clone() if torch.is_tensor(step) else step,
                 **{k: partition.flat[i][k] for k in MOMENTS}} for i, step in enumerate(partition.steps)}
    out = {k: v for k, v in partition.common.items() if k != "param_groups"}
    out.update(base_optimizer_state={"state": state, "param_groups": partition.common["param_groups"]},
               single_partition_of_fp32_groups=[g["fp32"] for g in partition.flat],
               group_paddings=opt.groups_padding, param_alignment_paddings=opt.round_robin_bit16_padding,
               partition_count=opt.partition_count, param_slice_mappings=slice_mappings(engine))
    return out


# ---------------------------------------------------------------------------------------------
# the live engine
# ---------------------------------------------------------------------------------------------

def hp_fragment(param: Any) -> Optional[torch.Tensor]:
    """This rank's fp32 master fragment of ``param`` kept by a ZeRO-1/2 (or bf16) optimizer, a view
    that writes through; None where the optimizer keeps none for it (stage 0, ZeRO-3)."""
    mapping = getattr(param, "_hp_mapping", None)
    return None if mapping is None else mapping.get_hp_fragment()


def slice_mappings(engine: Any) -> Any:
    """The per-parameter slice mappings a ZeRO-1/2 optimizer writes into its state dict."""
    return engine.optimizer._param_slice_mappings


def zero12_layout(engine: Any) -> list[tuple[int, list[tuple[str, int, int, int]]]]:
    """Per parameter group of the engine's ZeRO-1/2 optimizer: (numel of this rank's flat
    partition, [(name, first element of the parameter held, its offset in the partition,
    elements)] for the parameters this rank holds a fragment of)."""
    opt = engine.optimizer
    out = []
    for i, group in enumerate(opt.bit16_groups):
        held = [(opt.param_names[p], *_fragment_addresses(p)) for p in group if hp_fragment(p) is not None]
        out.append((int(opt.single_partition_of_fp32_groups[i].numel()), held))
    return out


def _fragment_addresses(param: Any) -> tuple[int, int, int]:
    """(first element of ``param`` this rank holds, its offset in the rank's flat partition, count)."""
    mapping = param._hp_mapping
    return (int(mapping.lp_fragment_address.start), int(mapping.hp_fragment_address.start),
            int(mapping.lp_fragment_address.numel))


def load_zero12_partition(engine: Any, state_dict: dict) -> None:
    """Load this rank's ZeRO-1/2 optimizer state with DeepSpeed's own loader (fp32 master from
    the state, not from the module weights)."""
    opt = engine.optimizer
    rank = torch.distributed.get_rank(group=opt.dp_process_group) if torch.distributed.is_initialized() else 0
    opt.load_state_dict([None] * rank + [state_dict], load_optimizer_states=True, load_from_fp32_weights=True)


def load_module_weights(engine: Any, model_states: dict) -> None:
    """The module's weights as saved (stages 0-2 save them whole, in the compute dtype)."""
    engine.module.load_state_dict(model_states["module"], strict=True)


def zero3_layout(engine: Any) -> list[list[tuple[str, int]]]:
    """Per sub-group of the engine's ZeRO-3 optimizer, (parameter name, numel of this rank's
    piece including padding), in the order of its flat partition."""
    opt = engine.optimizer
    return [[(opt.param_names[p], int(p.ds_tensor.ds_numel)) for p in group] for group in opt.fp16_groups]


def load_zero3_partition(engine: Any, state_dict: dict) -> None:
    """Load this rank's ZeRO-3 optimizer state (the dict :func:`zero3_state_dict` builds) with
    DeepSpeed's own loader: fp32 master, moments, step, and the module's shard from the master."""
    opt = engine.optimizer
    rank = torch.distributed.get_rank(group=opt.dp_process_group) if torch.distributed.is_initialized() else 0
    opt.checkpoint_event_prologue()
    opt.load_state_dict([None] * rank + [state_dict], load_optimizer_states=True)
    opt.checkpoint_event_epilogue()


def restore_engine_state(engine: Any, model_states: dict) -> None:
    """The LR scheduler and the engine's counters, as DeepSpeed's own load restores them."""
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
    engine.global_steps = model_states["global_steps"]
    engine.global_samples = model_states.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = model_states["skipped_steps"]
