"""Resuming a checkpoint on another number of ranks, exactly.

A checkpoint written by W ranks resumes on any W' ranks for which the global batch still splits
(``batch_size`` a multiple of W'). What carries over, bit for bit as saved: the fp32 master
weights, both Adam moments, the optimizer's step count and hyper-parameters, the LR scheduler,
the engine's counters, the train state (global: step, updates, non-finite counts, pending
losses), and so the logit-scale clamp state (it lives in the fp32 master). Per rank:

* RNG: new rank r continues the RNG states of old rank r; ranks r >= W start from a seed made of
  the run's seed, r and the step. A run on another world size therefore cannot match, bit for
  bit, what the old world would have drawn on its ranks (nor does its batch split).
* data: kept per stream, not per rank; the loop maps the data states of all saved ranks to each
  rank of the new world (:func:`llip_scale.data.reshard_state`), so :func:`rank_state` leaves it out.

How the optimizer state moves, by the layout of the checkpoint (:func:`ds_compat.layout`):

    whole (stage 0, fp32/fp16): the one model states file holds everything ──> DeepSpeed loads it
        on any number of ranks
    zero3: old rank r holds piece r (ceil(n / W) elements, the last ones padded) of every
        parameter ──> new rank r' needs elements [r' q', (r'+1) q') with q' = ceil(n / W'):
        zero3_pieces() names the old ranks and offsets that hold them ──> read through a
        memory map (only those pages) ──> the new rank's flat partition ──> DeepSpeed's loader
    zero12 (stages 1, 2): old rank r holds a contiguous run of each group's flattened
        parameters; its slice mappings say which part of which parameter ──> the new engine's
        own mappings say which parts the new rank holds ──> copied the same way; the module's
        weights come whole from the model states file, as DeepSpeed's own load reads them

No conversion is written: each new rank reads only its slices of the verified checkpoint, so
there is nothing to redo, or to leave half-written, when a job is preempted during a resume.
Peak memory per rank: its own new partition (fp32 master + 2 moments: 12 bytes per parameter
/ W') on top of the engine's state, plus whatever of the memory-mapped files the page cache keeps.

The partitions of DeepSpeed's bf16 optimizer (bf16 at stage 0) are not resharded: such a
checkpoint resumes on the world size that wrote it only.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from llip_scale.checkpoints import ds_compat
from llip_scale.errors import ConfigError


class ReshardError(RuntimeError):
    """The checkpoint cannot be resumed on this number of ranks."""


# ---------------------------------------------------------------------------------------------
# the global batch on a world size
# ---------------------------------------------------------------------------------------------

def batch_split(batch_size: int, world_size: int, micro_batch_size: int = 0) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) of a global batch on ``world_size``
    ranks; ``micro_batch_size`` 0 means one micro batch per step. ConfigError (naming the
    world sizes that work) when the batch does not split."""
    per_rank, rest = divmod(batch_size, world_size)
    micro = micro_batch_size or per_rank
    if rest or per_rank == 0 or per_rank % micro:
        fit = _some(valid_world_sizes(batch_size, micro_batch_size))
        if micro_batch_size:
            micros = [m for m in range(1, per_rank + 1) if per_rank % m == 0] if not rest else []
            other = f" (or set micro_batch_size to {_some(micros)}, or 0)" if micros else ""
            raise ConfigError(f"batch_size={batch_size} is not divisible by the {world_size} ranks x micro_batch_size="
                              f"{micro_batch_size}; set batch_size to a multiple of {world_size * micro_batch_size}, "
                              f"or run on {fit} ranks{other}")
        raise ConfigError(f"batch_size={batch_size} is not divisible by the {world_size} ranks; set batch_size to a "
                          f"multiple of {world_size}, or run on {fit} ranks")
    return micro, per_rank // micro


def valid_world_sizes(batch_size: int, micro_batch_size: int = 0) -> list[int]:
    """Every world size the global batch splits over."""
    if micro_batch_size and batch_size % micro_batch_size:
        return []
    unit = batch_size // micro_batch_size if micro_batch_size else batch_size
    return [w for w in range(1, unit + 1) if unit % w == 0]


def _some(sizes: list[int], most: int = 12) -> str:
    if not sizes:
        return "no number of"
    shown = sizes if len(sizes) <= most else sizes[:most - 1] + ["...", sizes[-1]]
    return ", ".join(map(str, shown[:-1])) + (" or " if len(shown) > 1 else "") + str(shown[-1])


def config_split(cfg: Any, world_size: int) -> tuple[int, int]:
    """(micro batch, accumulation steps) of a run config on ``world_size`` ranks: the one place
    that reads the batch settings of a config (``micro_batch_size`` where the config has one)."""
    return batch_split(cfg.batch_size, world_size, getattr(cfg, "micro_batch_size", 0) or 0)


def saved_config_split(saved: dict, world_size: int) -> tuple[int, int]:
    """:func:`config_split` of a run's saved ``config.yaml`` (a dict)."""
    return batch_split(int(saved["batch_size"]), world_size, int(saved.get("micro_batch_size") or 0))


def check_world_size(cfg: Any, world_size: int) -> None:
    """ConfigError before any compute when the config's global batch does not split over
    ``world_size`` ranks."""
    config_split(cfg, world_size)


def resumed_line(step: int, saved_world: int, world: int, saved_split: tuple[int, int],
                 split: tuple[int, int], batch_size: int) -> str:
    """The log line of a resume on another world size, e.g. ``resumed step 3000 on 16 ranks
    (was 32): micro batch 64, accum 2 (was 1), global batch 32768 unchanged``."""
    (old_micro, old_accum), (micro, accum) = saved_split, split
    was_micro = f" (was {old_micro})" if old_micro != micro else ""
    was_accum = f" (was {old_accum})" if old_accum != accum else ""
    return (f"resumed step {step} on {world} ranks (was {saved_world}): micro batch {micro}{was_micro}, "
            f"accum {accum}{was_accum}, global batch {batch_size} unchanged")


# ---------------------------------------------------------------------------------------------
# can it be resumed here
# ---------------------------------------------------------------------------------------------

def check_resumable(path: Path, marker: dict, world_size: int) -> None:
    """ReshardError when the checkpoint at ``path`` (with completion marker ``marker``) cannot
    be resumed on ``world_size`` ranks: bf16 optimizer partitions written by another number."""
    saved = marker["world_size"]
    if saved == world_size:
        return
    if ds_compat.layout(marker["files"], marker.get("zero_stage", 3)) == "bf16":
        raise ReshardError(f"{path} holds the partitions of DeepSpeed's bf16 optimizer (bf16 at ZeRO stage 0), "
                           f"which resume only on the {saved} ranks that wrote them (this run has {world_size}); "
                           f"rerun with {saved} ranks, or use ZeRO stage 1-3 with bf16")


# ---------------------------------------------------------------------------------------------
# ZeRO-3 partitions on another world size
# ---------------------------------------------------------------------------------------------

def zero3_piece(numel: int, world: int, rank: int) -> tuple[int, int, int]:
    """(first element, elements held, piece size incl. padding) of ``rank``'s piece of a
    parameter of ``numel`` elements under ZeRO-3 on ``world`` ranks."""
    size = -(-numel // world)
    start = min(rank * size, numel)
    return start, min(numel, start + size) - start, size


def zero3_pieces(numel: int, old_world: int, new_world: int, new_rank: int) -> list[tuple[int, int, int, int]]:
    """Where ``new_rank``'s piece of a parameter lies in the old world's pieces: a list of
    (old rank, offset in its piece, offset in the new piece, elements)."""
    start, count, _ = zero3_piece(numel, new_world, new_rank)
    old_size = -(-numel // old_world)
    out = []
    pos = start
    while pos < start + count:
        old_rank = pos // old_size
        take = min(start + count, (old_rank + 1) * old_size) - pos
        out.append((old_rank, pos - old_rank * old_size, pos - start, take))
        pos += take
    return out


def build_zero3_partition(folder: Path, shapes: list[dict[str, torch.Size]], old_world: int,
                          new_layout: list[list[tuple[str, int]]], new_world: int,
                          new_rank: int) -> ds_compat.Zero3Partition:
    """``new_rank``'s ZeRO-3 partition on ``new_world`` ranks, read from the partitions of the
    ``old_world`` ranks in ``folder`` (only the old ranks that hold a slice of it are opened)."""
    names = [[n for n, _ in group] for group in new_layout]
    if names != [list(group) for group in shapes]:
        raise ReshardError("the model's parameters differ from the checkpoint's (names or order); "
                           "resume with the model config that wrote it")
    opened: dict[int, ds_compat.Zero3Partition] = {}

    def old(rank: int) -> ds_compat.Zero3Partition:
        if rank not in opened:
            opened[rank] = ds_compat.read_zero3_partition(folder, rank)
        return opened[rank]

    flat = []
    for g, (group, layout) in enumerate(zip(shapes, new_layout)):
        total = sum(size for _, size in layout)
        out = {k: torch.zeros(total, dtype=torch.float32) for k in ("fp32", *ds_compat.MOMENTS)}
        old_offset = new_offset = 0
        for (name, shape), (_, size) in zip(group.items(), layout):
            numel = int(np.prod(shape)) if len(shape) else 1
            if size != zero3_piece(numel, new_world, new_rank)[2]:
                raise ReshardError(f"{name}: the engine holds {size} elements on rank {new_rank} where ZeRO-3 "
                                   f"splits {numel} into pieces of {zero3_piece(numel, new_world, new_rank)[2]}")
            for old_rank, src, dst, count in zero3_pieces(numel, old_world, new_world, new_rank):
                for key, tensor in old(old_rank).flat[g].items():
                    out[key][new_offset + dst:new_offset + dst + count] = \
                        tensor[old_offset + src:old_offset + src + count]
            old_offset += -(-numel // old_world)
            new_offset += size
        flat.append(out)
    first = old(0)
    return ds_compat.Zero3Partition(flat, first.steps, first.common)


def _param_ranges(fragments: list[dict[str, tuple[int, int]]]) -> dict[str, list[tuple[int, int, int, int]]]:
    """name -> [(old rank, start in its partition, first element of the parameter, elements)],
    from the slice mappings of all old ranks (``fragments[rank]``) of one parameter group: the
    partitions are consecutive runs of the flattened group, so a parameter's fragments follow
    each other in rank order."""
    out: dict[str, list[tuple[int, int, int, int]]] = {}
    for rank, mapping in enumerate(fragments):
        for name, (start, numel) in mapping.items():
            pieces = out.setdefault(name, [])
            first = pieces[-1][2] + pieces[-1][3] if pieces else 0
            pieces.append((rank, start, first, numel))
    return out


def build_zero12_partition(folder: Path, old_world: int,
                           new_layout: list[tuple[int, list[tuple[str, int, int, int]]]]) -> ds_compat.Zero12Partition:
    """A new rank's ZeRO-1/2 partition (its layout from :func:`ds_compat.zero12_layout`),
    read from the partitions of the ``old_world`` ranks in ``folder`` (memory-mapped: only the
    slices it needs are read)."""
    old = [ds_compat.read_zero12_partition(folder, r) for r in range(old_world)]
    flat = []
    for g, (size, held) in enumerate(new_layout):
        ranges = _param_ranges([o.fragments[g] for o in old])
        out = {k: torch.zeros(size, dtype=torch.float32) for k in ("fp32", *ds_compat.MOMENTS)}
        for name, lp_start, hp_start, numel in held:
            if name not in ranges:
                raise ReshardError(f"{name} is not in the checkpoint; resume with the model config that wrote it")
            for rank, start, first, count in ranges[name]:
                lo, hi = max(lp_start, first), min(lp_start + numel, first + count)
                if lo >= hi:
                    continue
                for key, tensor in old[rank].flat[g].items():
                    out[key][hp_start + lo - lp_start:hp_start + hi - lp_start] = \
                        tensor[start + lo - first:start + hi - first]
        flat.append(out)
    return ds_compat.Zero12Partition(flat, [], old[0].steps, old[0].common)


def load_resharded(engine: Any, folder: Path, marker: dict, world_size: int, rank: int) -> None:
    """Load the checkpoint at ``folder``, written by ``marker["world_size"]`` ranks, into the
    engine of ``rank`` of ``world_size`` (a collective under ZeRO-3)."""
    stage = marker.get("zero_stage", 3)
    states = ds_compat.read_model_states(folder, stage)
    if ds_compat.layout(marker["files"], stage) == "zero12":
        ds_compat.load_module_weights(engine, states)
        partition = build_zero12_partition(folder, marker["world_size"], ds_compat.zero12_layout(engine))
        ds_compat.load_zero12_partition(engine, ds_compat.zero12_state_dict(engine, partition))
    else:
        shapes = ds_compat.zero3_param_shapes(states)
        partition = build_zero3_partition(folder, shapes, marker["world_size"], ds_compat.zero3_layout(engine),
                                          world_size, rank)
        ds_compat.load_zero3_partition(engine, ds_compat.zero3_state_dict(partition, world_size))
    ds_compat.restore_engine_state(engine, states)


def full_optimizer_state(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[Any], dict]:
    """(name -> {"fp32", "exp_avg", "exp_avg_sq"} as full tensors, step per group, the state
    common to all ranks) of a ZeRO-1/2/3 checkpoint, in one process: for inspecting and
    comparing checkpoints of small models (it holds the whole optimizer state)."""
    folder = Path(folder)
    marker = json.loads((folder / "complete.json").read_text())
    stage, world = marker.get("zero_stage", 3), marker["world_size"]
    kind = ds_compat.layout(marker["files"], stage)
    if kind == "zero3":
        shapes = ds_compat.zero3_param_shapes(ds_compat.read_model_states(folder, stage))
        whole = [[(name, int(np.prod(shape)) if len(shape) else 1) for name, shape in g.items()] for g in shapes]
        part = build_zero3_partition(folder, shapes, world, whole, 1, 0)
        out = {}
        for g, group in enumerate(whole):
            offset = 0
            for name, numel in group:
                out[name] = {k: t[offset:offset + numel] for k, t in part.flat[g].items()}
                offset += numel
        return out, part.steps, part.common
    if kind == "zero12":
        parts = [ds_compat.read_zero12_partition(folder, r) for r in range(world)]
        out = {}
        for g in range(len(parts[0].flat)):
            for name, pieces in _param_ranges([p.fragments[g] for p in parts]).items():
                out[name] = {k: torch.cat([parts[r].flat[g][k][s:s + n] for r, s, _, n in pieces])
                             for k in ("fp32", *ds_compat.MOMENTS)}
        return out, parts[0].steps, parts[0].common
    raise ValueError(f"{folder} keeps its optimizer state {kind}, not in ZeRO partitions")


def needs_reshard(marker: dict, world_size: int) -> bool:
    """Whether the engine cannot load the checkpoint with DeepSpeed's own loader."""
    if marker["world_size"] == world_size:
        return False
    return ds_compat.layout(marker["files"], marker.get("zero_stage", 3)) != "whole"


# ---------------------------------------------------------------------------------------------
# per-rank states: train, RNG, data
# ---------------------------------------------------------------------------------------------

class SavedStates(Sequence):
    """The saved per-rank train states of a checkpoint, read when first asked for."""

    def __init__(self, read: Callable[[int], dict], world_size: int):
        self._read, self._world, self._cache = read, world_size, {}

    def __len__(self) -> int:
        return self._world

    def __getitem__(self, rank: int) -> dict:  # type: ignore[override]
        if not 0 <= rank < self._world:
            raise IndexError(rank)
        if rank not in self._cache:
            self._cache[rank] = self._read(rank)
        return self._cache[rank]


def rank_state(saved: SavedStates, world_size: int, rank: int, seed: int) -> dict:
    """The rank state (``{"train": ..., "rng": ...}``) of ``rank`` of ``world_size`` ranks from a
    checkpoint's saved states: the train state of rank 0 (it is global) without its data state
    (the caller maps the per-stream data states of all ranks), the RNG of the same rank where the
    old world had one, else a fresh one from (seed, rank, step)."""
    train = {**saved[0]["train"], "data": None}
    rng = saved[rank]["rng"] if rank < len(saved) else fresh_rng(seed, rank, train.get("step", 0))
    return {"train": train, "rng": rng}


def fresh_rng(seed: int, rank: int, step: int) -> dict:
    """RNG states (as :func:`llip_scale.checkpoints.store.rng_state` returns) seeded from
    (seed, rank, step): a rank that did not exist in the saved world."""
    ss = np.random.SeedSequence([seed, rank, step])
    words = ss.generate_state(4)
    py = random.Random(int(words[0]) << 32 | int(words[1]))
    generator = torch.Generator().manual_seed(int(words[2]) << 32 | int(words[3]))
    return {"python": py.getstate(), "numpy": np.random.RandomState(ss.generate_state(1)[0]).get_state(),
            "torch": generator.get_state()}
