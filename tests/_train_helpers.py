"""Shared pieces of the trainer tests: a very small config, launching runs, comparing checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading DeepSpeed checkpoints imports deepspeed
PYTHON = sys.executable
# A guard against a run that hangs, not a guess at its speed: these runs take seconds to a few
# minutes on an idle machine and many times that on one busy with other work. Tests wait for
# events (a file, a log line, a process exit); only a run stuck for this long fails them.
HANG_LIMIT_S = float(os.environ.get("LLIP_TEST_HANG_LIMIT_S", 3600))

# The tiny model, smaller still: a run of a few steps takes seconds on two CPU cores.
SMALL = {
    "base": str(REPO / "configs" / "models" / "tiny.yaml"),
    "seed": 3,
    "steps": 8,
    "batch_size": 8,
    "data": {"source": "synthetic"},
    "model": {
        "vision": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64,
                   "num_tokens": 4},
        "text": {"vocab_size": 128, "context_length": 16, "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64},
        "head": {"embed_dim": 32, "num_heads": 2},
    },
    "optim": {"lr": 2e-3, "warmup_steps": 2},
    "checkpoint": {"every": 4, "keep_last": 2},
    "logging": {"every": 1, "tensorboard": True, "progress": "lines"},
    "eval": {"heldout_samples": 16},
}


def write_config(path: Path, **sections: Any) -> Path:
    data = json.loads(json.dumps(SMALL))
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def run_env() -> dict:
    """The runs of these tests are CPU runs (gloo, fp32) even where a GPU is present."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def train_command(config: Path, overrides: list[str], nproc: int = 2, module: str = "llip_scale.train") -> list[str]:
    if nproc == 1:
        return [PYTHON, "-m", module, str(config), *overrides]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
            "-m", module, str(config), *overrides]


def run(cmd: list[str], timeout: float = HANG_LIMIT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)


def wait_for(event: Callable[[], bool], what: str, gone: Callable[[], bool] = lambda: False,
             poll_s: float = 0.2) -> None:
    """Poll until ``event()`` holds; fail when ``gone()`` says it never will (the process ended)
    or after HANG_LIMIT_S."""
    started = time.monotonic()
    while not event():
        assert not gone(), f"{what}: the process ended first"
        assert time.monotonic() - started < HANG_LIMIT_S, f"{what}: nothing after {HANG_LIMIT_S:.0f} s (hung?)"
        time.sleep(poll_s)


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


# ---------------------------------------------------------------------------------------------
# comparing checkpoints bit for bit
# ---------------------------------------------------------------------------------------------

def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Every leaf where ``a`` and ``b`` differ (tensors and arrays compared bit for bit)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a, b.view(-1).view(torch.uint8) if b.numel() else b)
        return [] if same else [where]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if type(a) is type(b) and hasattr(a, "__dict__") and not isinstance(a, type):
        return differences(vars(a), vars(b), where)  # e.g. DeepSpeed's loss scaler
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def zero3_padding(param_shapes: list[dict], world: int, rank: int) -> list[torch.Tensor]:
    """Per parameter group, a mask of the padding in ``rank``'s flat fp32 partition under ZeRO-3
    (each parameter is split into ``ceil(numel / world)`` pieces; the last ranks' are padded)."""
    masks = []
    for shapes in param_shapes:
        parts = []
        for shape in shapes.values():
            n = int(np.prod(shape)) if len(shape) else 1
            piece = -(-n // world)
            valid = max(0, min(piece, n - rank * piece))
            parts.append(torch.arange(piece) >= valid)
        masks.append(torch.cat(parts))
    return masks


def _drop_zero3_padding(state: dict, masks: list[torch.Tensor]) -> dict:
    """The padding of ZeRO-3 partitions is uninitialised memory, never read: leave it out."""
    groups = state["optimizer_state_dict"]["fp32_flat_groups"]
    state["optimizer_state_dict"]["fp32_flat_groups"] = [g.detach()[~m] for g, m in zip(groups, masks)]
    return state


def checkpoint_differences(a: Path, b: Path) -> list[str]:
    """Compare two checkpoint folders: every saved state bit for bit, configs up to run_dir."""
    names_a = {p.name for p in a.iterdir()}
    names_b = {p.name for p in b.iterdir()}
    if names_a != names_b:
        return [f"files differ: {sorted(names_a ^ names_b)}"]
    out = []
    world = json.loads((a / "complete.json").read_text())["world_size"]
    for name in sorted(names_a):
        if name.endswith("optim_states.pt") and name.startswith("zero_pp_rank_"):
            rank = int(name.split("_")[3])
            shapes = torch.load(a / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False)["param_shapes"]
            masks = zero3_padding(shapes, world, rank)
            sa, sb = (_drop_zero3_padding(torch.load(d / name, weights_only=False), masks) for d in (a, b))
            out += differences(sa, sb, name)
        elif name.endswith(".pt"):
            out += differences(torch.load(a / name, weights_only=False), torch.load(b / name, weights_only=False), name)
        elif name == "config.yaml":
            ca, cb = yaml.safe_load((a / name).read_text()), yaml.safe_load((b / name).read_text())
            ca.pop("run_dir"), cb.pop("run_dir")
            out += differences(ca, cb, name)
    return out


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def newest_complete(run_dir: Path) -> Optional[int]:
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if (p / "complete.json").is_file()]
    return max(steps) if steps else None


def weight_differences(got: dict, want: dict, lr: float, steps: int, rel: float = 1e-6) -> list[str]:
    """Weights of two runs that differ only in the order of their fp32 reductions (another number
    of ranks or micro-batches): every tensor within ``rel`` of the largest weight. The exception
    is the key bias of attention: softmax does not change when a constant is added to every key
    score, so its exact gradient is zero and what is computed is rounding noise, which Adam's
    normalisation turns into updates of up to about ``lr`` each, of either sign."""
    scale = max(float(w.detach().abs().max()) for w in want.values())
    out = []
    for name, w in want.items():
        diff = (got[name] - w).detach().abs().flatten()
        if name.endswith("attn.in_proj.bias"):  # [query | key | value] biases
            third = diff.numel() // 3
            if float(diff[third:2 * third].max()) > (steps + 1) * lr:
                out.append(f"{name} (key bias): {float(diff[third:2 * third].max()):.3g} > {(steps + 1) * lr:.3g}")
            diff = torch.cat([diff[:third], diff[2 * third:]])
        if float(diff.max()) > rel * scale:
            out.append(f"{name}: {float(diff.max()):.3g} > {rel * scale:.3g}")
    return out
