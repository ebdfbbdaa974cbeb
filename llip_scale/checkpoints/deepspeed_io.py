"""DeepSpeed's checkpoint files: save and load an engine's, and read them offline.

:mod:`llip_scale.checkpoints.store` calls :func:`save_engine` / :func:`load_engine` with the
engine the training built (any object with DeepSpeed's ``save_checkpoint`` / ``load_checkpoint``);
:func:`consolidated_state_dict` rebuilds the full fp32 weights from a folder of any ZeRO stage in
one process, without starting ranks (exports, ``create_model`` on a run folder). DeepSpeed itself
is imported only by the function that needs its consolidation, so reading a checkpoint's markers
or exporting stage-0 weights never loads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def save_engine(engine: Any, root: Path, tag: str) -> None:
    """Model, optimizer and scheduler of every rank into ``root/tag`` (a collective)."""
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)


def load_engine(engine: Any, root: Path, tag: str) -> None:
    """Load ``root/tag`` into the engine; raises when DeepSpeed reports a failed load."""
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {root / tag}")


def zero_dim_parameters(checkpoint_dir: Path) -> list[str]:
    """Names of the parameters a checkpoint folder stores as 0-dim tensors, from its first model
    states file: the shapes ZeRO records, or the module's own tensors at stage 0. Checkpoints
    written while the logit scale and bias were 0-dim hold them so; [] when there is no such file."""
    files = sorted(Path(checkpoint_dir).glob("*model_states.pt"))
    if not files:
        return []
    state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    shapes: dict[str, Any] = {}
    for group in state.get("param_shapes") or []:  # ZeRO: one {name: shape} per parameter group
        shapes.update(group)
    if not shapes:
        shapes = {name: t.shape for name, t in (state.get("module") or {}).items()}
    return sorted(name for name, shape in shapes.items() if len(shape) == 0)


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, Tensor]:
    """Full fp32 weights from a checkpoint folder of any ZeRO stage (offline, one process)."""
    checkpoint_dir = Path(checkpoint_dir)
    if list(checkpoint_dir.glob("*optim_states.pt")):  # ZeRO-1/2/3: rebuild from the partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # loads DeepSpeed: only here

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
    else:
        files = sorted(checkpoint_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{checkpoint_dir} holds no DeepSpeed model states; pass a checkpoint "
                                    "folder such as RUN/checkpoints/step_0000001000")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}
