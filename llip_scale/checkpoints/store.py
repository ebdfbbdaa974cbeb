"""Checkpoints: layout, save, find the newest complete one, resume, retention, export.

Layout of one checkpoint, ``RUN/checkpoints/step_0000001000/``:

    (DeepSpeed files)       model, optimizer and scheduler states of every rank
    train_state_rank00000.pt ...  per-rank train state: step counters, data state, RNG states
    config.yaml             the resolved config of the run
    complete.json           written last, by rank 0, after a barrier: step, world size, and
                            the size and CRC-32 of every file above

Save: every rank writes its DeepSpeed shard and its train state -> barrier -> each rank
checksums the files it wrote (still in its page cache; 64 MiB blocks in parallel threads) ->
rank 0 gathers the sizes and checksums into the marker -> barrier -> rank 0 deletes old
checkpoints beyond ``keep_last``. Resume: newest first, a checkpoint without a readable marker,
or whose files are missing, not the recorded size, or not the recorded checksum (bit rot, a copy
cut short and padded), is skipped with a warning saying why; each rank checks its own share of
the files, so the check reads every byte once across the ranks. One that fails to load on any
rank is skipped the same way (all ranks agree on the outcome), and skipped folders are renamed
``*.skipped``. ``llip-train --verify-checkpoint PATH`` runs the same checks on one folder.
A checkpoint written by another number of ranks is loaded through :mod:`llip_scale.checkpoints.reshard`
(each rank reads its slices of the ZeRO partitions; the train state of rank 0, the RNG state of
the same rank where there was one, the data state through one replaceable rule).
Export rebuilds the full fp32 weights into one safetensors file next to the model config, which
:func:`llip_scale.load_pretrained` reads.
"""
from __future__ import annotations

import datetime
import io
import json
import logging
import os
import random
import re
import shutil
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml

from llip_scale.checkpoints.deepspeed_io import consolidated_state_dict, load_engine, save_engine, zero_dim_parameters
from llip_scale.checkpoints.reshard import (
    ReshardError,
    SavedStates,
    check_resumable,
    config_split,
    load_resharded,
    needs_reshard,
    rank_state,
    resumed_line,
    saved_config_split,
)
from llip_scale.config import Config, to_dict
from llip_scale.dist.collectives import DistEnv, all_gather_objects, barrier, broadcast_object
from llip_scale.interop.pretrained import save_weights

log = logging.getLogger("llip_scale.checkpoints.store")

MARKER = "complete.json"
PREFIX = "step_"


class ResumeError(RuntimeError):
    """The run folder holds checkpoints this run cannot continue from."""


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"{PREFIX}{step:010d}"


def rank_state_name(rank: int) -> str:
    return f"train_state_rank{rank:05d}.pt"


@dataclass(frozen=True)
class CheckpointDir:
    step: int
    path: Path


def list_checkpoints(run_dir: str | os.PathLike) -> list[CheckpointDir]:
    """Every ``step_*`` folder, newest first (complete or not)."""
    root = checkpoint_root(run_dir)
    found = []
    for p in root.glob(f"{PREFIX}*") if root.is_dir() else []:
        suffix = p.name[len(PREFIX):]
        if p.is_dir() and suffix.isdigit():
            found.append(CheckpointDir(int(suffix), p))
    return sorted(found, key=lambda f: f.step, reverse=True)


def find_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """A checkpoint folder for ``path``: itself, or a run folder's newest complete checkpoint."""
    path = Path(path)
    if (path / "complete.json").is_file() or path.name.startswith("step_"):
        return path
    for found in list_checkpoints(path):
        if first_problem(found.path, contents=False) is None:  # export checks the contents
            return found.path
    return None


# ---------------------------------------------------------------------------------------------
# RNG and small files
# ---------------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, then rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# checksums
# ---------------------------------------------------------------------------------------------

# CRC-32 is made for catching corrupted bytes: it catches every burst of up to 32 bits, so any one
# flipped byte. A file's checksum is the CRC-32 of the CRC-32s of its 64 MiB blocks, so the blocks
# of all files are checksummed in parallel threads (zlib and file reads release the GIL); a byte
# flipped in a block changes that block's CRC, which changes the file's.
_BLOCK = 64 << 20
_RANK_IN_NAME = re.compile(r"(?:pp_rank_|rank)(\d+)")


_buffers = threading.local()  # one reused block buffer per thread: no 64 MiB allocation per block


def _block_crc(path: Path, offset: int) -> int:
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) != _BLOCK:
        buf = _buffers.buf = bytearray(_BLOCK)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        n = f.readinto(buf)
    return zlib.crc32(memoryview(buf)[:n])


def _threads(tasks: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(tasks, cores, 32))


def checksum_files(folder: Path, names: list[str]) -> dict[str, tuple[int, str]]:
    """name -> (size, checksum as 8 hex digits) for ``names`` under ``folder``."""
    sizes = {name: (folder / name).stat().st_size for name in names}
    blocks = [(name, offset) for name in names for offset in range(0, max(sizes[name], 1), _BLOCK)]
    if not blocks:
        return {}
    with ThreadPoolExecutor(max_workers=_threads(len(blocks))) as pool:
        crcs = list(pool.map(lambda block: _block_crc(folder / block[0], block[1]), blocks))
    per_file: dict[str, bytes] = {name: b"" for name in names}
    for (name, _), crc in zip(blocks, crcs):
        per_file[name] += crc.to_bytes(4, "big")
    return {name: (sizes[name], f"{zlib.crc32(per_file[name]):08x}") for name in names}


def crc32_file(path: Path) -> tuple[int, str]:
    """(size, checksum) of one file."""
    return checksum_files(path.parent, [path.name])[path.name]


def owner(name: str, world_size: int) -> int:
    """The rank that checksums a file: the rank in its name (DeepSpeed's ``zero_pp_rank_R``, our
    ``train_state_rankRRRRR``), which wrote it and has it in its page cache; else rank 0."""
    m = _RANK_IN_NAME.search(name)
    return int(m.group(1)) % world_size if m else 0


def _mine(names: list[str], env: DistEnv) -> list[str]:
    return [n for n in names if owner(n, env.world_size) == env.rank]


def mismatches(folder: Path, expected: dict[str, str], names: Optional[list[str]] = None) -> list[str]:
    """One line per file of ``names`` (default: all) whose contents differ from its recorded CRC."""
    names = sorted(expected) if names is None else [n for n in names if n in expected]
    out = []
    for name, (_, crc) in checksum_files(folder, names).items():
        if crc != expected[name]:
            out.append(f"{name} does not match its checksum (CRC-32 {crc} read, {expected[name]} written): "
                       "its contents changed after the save")
    return out


# ---------------------------------------------------------------------------------------------
# save and retention
# ---------------------------------------------------------------------------------------------

def save(engine: Any, cfg: Config, step: int, rank_state: dict, env: DistEnv) -> Path:
    """Write the checkpoint of ``step`` on every rank (a collective); return its folder."""
    root = checkpoint_root(cfg.run_dir)
    path = root / step_tag(step)
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # left by an attempt that died while writing this step
            shutil.rmtree(path)
    barrier()
    save_engine(engine, root, path.name)
    _write_atomic(path / rank_state_name(env.rank), _torch_bytes(rank_state))
    if env.is_main:
        _write_atomic(path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    barrier()
    names = broadcast_object([str(f.relative_to(path)) for f in sorted(path.rglob("*")) if f.is_file()]
                             if env.is_main else None)
    sums: dict[str, tuple[int, str]] = {}
    for part in all_gather_objects(checksum_files(path, _mine(names, env))):
        sums.update(part)
    if env.is_main:
        write_marker(path, step, env.world_size, cfg.distributed.zero_stage, sums)
    barrier()
    if env.is_main:
        prune(cfg.run_dir, cfg.checkpoint.keep_last, step)
    return path


def write_marker(path: Path, step: int, world_size: int, zero_stage: int, sums: dict[str, tuple[int, str]]) -> None:
    """The completion marker: what was written (name -> (size, CRC-32)) and by how many ranks."""
    items = sorted(sums.items())
    marker = {"step": step, "world_size": world_size, "zero_stage": zero_stage,
              "time": datetime.datetime.now().isoformat(timespec="seconds"),
              "files": {n: size for n, (size, _) in items}, "crc32": {n: crc for n, (_, crc) in items}}
    marker["marker_crc32"] = _marker_crc(marker)
    _write_atomic(path / MARKER, json.dumps(marker, indent=1).encode())


def prune(run_dir: str | os.PathLike, keep_last: int, current: int) -> list[Path]:
    """Keep the ``keep_last`` newest complete checkpoints up to ``current``; drop older ones
    and unfinished writes older than ``current``. Newer folders (from an abandoned attempt
    beyond the resume point) are left alone: this run rewrites them when it gets there."""
    removed, kept = [], 0
    for found in list_checkpoints(run_dir):
        if found.step > current:
            continue
        complete = (found.path / MARKER).is_file()
        if complete and kept < keep_last:
            kept += 1
            continue
        if complete or found.step < current:
            shutil.rmtree(found.path, ignore_errors=True)
            removed.append(found.path)
    return removed


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------

def _marker_crc(marker: dict) -> str:
    """The marker's checksum of its own contents (so a changed step or world size is caught too)."""
    content = {k: v for k, v in marker.items() if k != "marker_crc32"}
    return f"{zlib.crc32(json.dumps(content, sort_keys=True).encode()):08x}"

def read_marker(path: Path) -> dict:
    """The completion marker of ``path``; ValueError saying why it cannot be used."""
    marker = path / MARKER
    if not marker.is_file():
        raise ValueError("it has no completion marker (its write was interrupted)")
    try:
        info = json.loads(marker.read_bytes().decode())
        # markers of older versions carry sizes only: no checksums to compare
        if "marker_crc32" in info and info["marker_crc32"] != _marker_crc(info):
            raise ValueError("it does not match its own checksum")
        info["files"], info["world_size"] = dict(info["files"]), int(info["world_size"])
        info["crc32"] = dict(info.get("crc32", {}))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"its completion marker is unreadable ({e})") from None
    return info


def problems(path: Path, world_size: Optional[int] = None, contents: bool = True) -> list[str]:
    """Every reason the checkpoint at ``path`` cannot be used (empty when it is sound): no or an
    unreadable marker, files missing or not the recorded size, and with ``contents`` files whose
    bytes are not the recorded checksum. With ``world_size`` (a resume by that many ranks),
    raises :class:`ResumeError` when it cannot be resumed on that many ranks
    (:func:`llip_scale.checkpoints.reshard.check_resumable`) or holds 0-dim parameters
    (:func:`check_parameter_shapes`)."""
    try:
        info = read_marker(path)
    except ValueError as e:
        return [str(e)]
    if world_size is not None:
        try:
            check_resumable(path, info, world_size)
        except ReshardError as e:
            raise ResumeError(str(e)) from None
    out = []
    for rel, size in info["files"].items():
        f = path / rel
        if not f.is_file():
            out.append(f"{rel} is missing")
        elif f.stat().st_size != size:
            out.append(f"{rel} has {f.stat().st_size} bytes where {size} were written")
    if contents and not out:
        out += mismatches(path, info["crc32"])
    if world_size is not None and not out:
        check_parameter_shapes(path)
    return out


def check_parameter_shapes(path: Path) -> None:
    """Raise :class:`ResumeError` when the checkpoint stores parameters as 0-dim tensors, as every
    checkpoint did while the logit scale and bias were 0-dim. Their weights export as they are
    (loading reads them as [1]), but the optimizer state keeps the old shapes: at stage 0 the
    first step after such a resume fails deep inside the optimizer. ZeRO's flat partitions do
    not record shapes, yet rather than resume some stages and not others, none is resumed."""
    try:
        names = zero_dim_parameters(path)
    except Exception:  # noqa: BLE001 - unreadable: the checksum pass that follows names the damage
        return
    if names:
        raise ResumeError(f"{path} holds {', '.join(names)} as 0-dim tensors, written before the logit scale and "
                          "bias became shape [1], so it cannot be resumed; export it (tools/export_checkpoint.py) "
                          "and start a new run in another run_dir")


def first_problem(path: Path, world_size: Optional[int] = None, contents: bool = True) -> Optional[str]:
    """The first of :func:`problems`, or None when the checkpoint is sound."""
    found = problems(path, world_size, contents)
    return found[0] if found else None


def _inspect(path: Path, world_size: int) -> tuple[Optional[str], bool]:
    """(reason it is unusable or None, whether that reason must stop the run), on rank 0; the
    structure only: the contents are checked by all ranks together (:func:`_verify_contents`)."""
    try:
        return first_problem(path, world_size, contents=False), False
    except ResumeError as e:
        return str(e), True


def _verify_contents(path: Path, env: DistEnv) -> Optional[str]:
    """Every rank checksums its share of the files (a collective); the first mismatch, or None."""
    expected = broadcast_object(read_marker(path)["crc32"] if env.is_main else None)
    try:
        mine = mismatches(path, expected, _mine(sorted(expected), env))
    except OSError as e:  # still take part in the gather, or the other ranks would wait for this one
        mine = [f"reading its files failed on rank {env.rank} ({e})"]
    found = all_gather_objects(mine)
    reasons = [r for per_rank in found for r in per_rank]
    return "; ".join(reasons) if reasons else None


def _on_all_ranks(action: Callable[[], Any], env: DistEnv, what: str) -> tuple[Any, Optional[str]]:
    """Run ``action`` on every rank; (its result, None) if it succeeded everywhere, else
    (None, reason). Agreeing after each phase keeps the ranks' collectives in step."""
    result, reason = None, None
    try:
        result = action()
    except Exception as e:  # noqa: BLE001 - any failure means: do not use this checkpoint
        first = str(e).splitlines()[0] if str(e) else ""
        reason = f"rank {env.rank} ({type(e).__name__}: {first})"
    reasons = [r for r in all_gather_objects(reason) if r is not None]
    return (None, f"{what} failed on " + "; ".join(reasons)) if reasons else (result, None)


def _read_rank_state(path: Path, rank: int) -> dict:
    return torch.load(path / rank_state_name(rank), map_location="cpu", weights_only=False)


def saved_data_states(run_dir: str | os.PathLike, step: int) -> list:
    """The data state of every rank that wrote the checkpoint of ``step``, in rank order (each
    rank reads all of these small files: the streams a rank owns depend on the world size)."""
    path = checkpoint_root(run_dir) / step_tag(step)
    return [_read_rank_state(path, r)["train"]["data"] for r in range(read_marker(path)["world_size"])]


def _rank_state(path: Path, marker: dict, env: DistEnv, seed: int) -> dict:
    """This rank's train state: its own file, or on another world size the rule of
    :func:`llip_scale.checkpoints.reshard.rank_state`."""
    if marker["world_size"] == env.world_size:
        return _read_rank_state(path, env.rank)
    return rank_state(SavedStates(lambda r: _read_rank_state(path, r), marker["world_size"]), env.world_size,
                      env.rank, seed)


def _load_engine(engine: Any, path: Path, marker: dict, env: DistEnv) -> None:
    if needs_reshard(marker, env.world_size):
        load_resharded(engine, path, marker, env.world_size, env.rank)
    else:  # the same world, or one file that every rank loads whole
        load_engine(engine, path.parent, path.name)


def _load(engine: Any, found: CheckpointDir, env: DistEnv, seed: int) -> tuple[Optional[dict], Optional[str], bool]:
    """(rank state, None, _) on success; (None, reason, whether the engine was touched)."""
    marker, why = _on_all_ranks(lambda: read_marker(found.path), env, "reading the completion marker")
    if why is None:
        state, why = _on_all_ranks(lambda: _rank_state(found.path, marker, env, seed), env, "reading the train state")
    if why is not None:
        return None, why, False
    _, why = _on_all_ranks(lambda: _load_engine(engine, found.path, marker, env), env,
                           "loading the model and optimizer")
    return (state, None, False) if why is None else (None, why, True)


def _log_resume(found: CheckpointDir, cfg: Optional[Config], env: DistEnv) -> None:
    """On rank 0: the checkpoint resumed, and what changed with the world size."""
    log.info("resumed from %s (step %d)", found.path, found.step)
    saved_world = read_marker(found.path)["world_size"]
    if cfg is None or saved_world == env.world_size:
        return
    try:
        saved_split = saved_config_split(yaml.safe_load((found.path / "config.yaml").read_text()), saved_world)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:  # the line only, not the resume
        log.info("resumed on %d ranks (was %d); the saved config.yaml is unreadable (%s)", env.world_size,
                 saved_world, e)
        return
    log.info(resumed_line(found.step, saved_world, env.world_size, saved_split, config_split(cfg, env.world_size),
                          cfg.batch_size))


def resume(engine: Any, run_dir: str | os.PathLike, env: DistEnv, cfg: Optional[Config] = None) -> Optional[dict]:
    """Load the newest usable checkpoint into ``engine``; return its rank state (RNG restored),
    or None when there is none and the run starts from scratch. A checkpoint of another world
    size is resharded (:mod:`llip_scale.checkpoints.reshard`); ``cfg`` seeds the RNG of ranks the saved
    world did not have and describes the new batch split in the log.

    Rank 0 inspects the folders and every rank follows its verdict. Checkpoints skipped on
    the way (newer than the one loaded, so from an attempt that died) are renamed to
    ``*.skipped``: kept for inspection, out of the way of retention and later resumes.
    """
    candidates = broadcast_object(list_checkpoints(run_dir) if env.is_main else None)
    loaded, skipped, tainted = None, [], None
    for found in candidates:
        why, fatal = broadcast_object(_inspect(found.path, env.world_size) if env.is_main else None)
        if fatal:
            raise ResumeError(why)
        if why is None:
            why = _verify_contents(found.path, env)
        if why is None:
            loaded, why, touched = _load(engine, found, env, cfg.seed if cfg is not None else 0)
            tainted = found.path if touched else tainted
            if loaded is not None:
                set_rng_state(loaded["rng"])
                if env.is_main:
                    _log_resume(found, cfg, env)
                break
        if env.is_main:
            log.warning("skipping checkpoint %s: %s", found.path, why)
        skipped.append(found.path)
    barrier()
    if env.is_main:
        for path in skipped:
            path.rename(path.with_name(f"{path.name}.skipped"))
    barrier()
    if loaded is None and tainted is not None:
        raise ResumeError(f"no checkpoint under {checkpoint_root(run_dir)} could be loaded and loading {tainted} "
                          "failed part-way; move the folder away to start the run over")
    return loaded


def verify(path: str | os.PathLike) -> tuple[bool, list[str]]:
    """(all sound, one line per checkpoint) for a checkpoint folder, or each checkpoint of a run
    folder: what ``llip-train --verify-checkpoint`` prints."""
    path = Path(path)
    if not path.is_dir():
        return False, [f"{path}: no such folder; pass RUN/checkpoints/step_XXXXXXXXXX or a run folder"]
    folders = [f.path for f in list_checkpoints(path)] if checkpoint_root(path).is_dir() else [path]
    if not folders:
        return False, [f"{path}: holds no step_* checkpoint folders"]
    lines, ok = [], True
    for folder in folders:
        found = problems(folder)
        ok = ok and not found
        lines.append(f"{folder}: " + ("; ".join(found) + "; a resume skips this checkpoint (restore it from a "
                                      "copy or delete it)" if found else _sound(folder)))
    return ok, lines


def _sound(folder: Path) -> str:
    info = read_marker(folder)
    how = "sizes and CRC-32 checksums match" if info["crc32"] else "sizes match (written without checksums)"
    total = sum(info["files"].values())
    return (f"ok: step {info['step']}, {info['world_size']} ranks, {len(info['files'])} files, "
            f"{total / 2 ** 20:.1f} MiB; {how}")


# ---------------------------------------------------------------------------------------------
# export and loading for inference
# ---------------------------------------------------------------------------------------------

def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Consolidate a checkpoint (any ZeRO stage) into ``out_dir/model.safetensors`` + ``config.yaml``."""

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
    why = first_problem(checkpoint)
    if why is not None:
        raise ResumeError(f"{checkpoint} cannot be exported: {why}")
    model_cfg = yaml.safe_load((checkpoint / "config.yaml").read_text())["model"]
    state = consolidated_state_dict(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = json.loads((checkpoint / MARKER).read_text())["step"]
    save_weights(state, out_dir / "model.safetensors", metadata={"step": str(step), "format": "pt"})
    (out_dir / "config.yaml").write_text(yaml.safe_dump({"model": model_cfg}, sort_keys=False))
    return out_dir / "model.safetensors"
