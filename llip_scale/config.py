"""Config tree: dataclasses, YAML loading, dotted CLI overrides, validation.

Flow: YAML file (with optional ``base:`` includes) -> nested dict -> dotted overrides applied
-> dataclass tree built with type checks (unknown keys name the closest valid key) ->
``validate()`` of every node -> the resolved tree is written back as YAML into the run folder.
Every error is a :class:`ConfigError` with one line naming the key and the fix.
"""
from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from llip_scale.config_files import apply_overrides, deep_merge, load_yaml
from llip_scale.data.config import DataConfig, stream_count
from llip_scale.errors import ConfigError, check, from_dict, path_field, to_dict, validate_tree
from llip_scale.launchers.config import LauncherConfig
from llip_scale.model.config import ModelConfig
from llip_scale.pairs.config import LossConfig

# Re-exported: the names a caller of the config tree needs, in one place.
__all__ = ["Config", "ConfigError", "load_config", "save_config", "build_config", "validate", "to_dict",
           "from_dict", "local_batch_size", "batch_split", "deep_merge", "apply_overrides", "load_yaml"]


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.2
    warmup_steps: int = 2000
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping
    max_nonfinite_steps: int = 10  # consecutive non-finite losses before the run stops

    def validate(self, name: str) -> None:
        check(self.lr > 0, f"{name}.lr must be > 0, got {self.lr}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
              f"{name}.betas must be two numbers in [0, 1), got {self.betas}")
        check(self.warmup_steps >= 0, f"{name}.warmup_steps must be >= 0")
        check(self.grad_clip >= 0, f"{name}.grad_clip must be >= 0 (0 disables it)")
        check(self.max_nonfinite_steps >= 1, f"{name}.max_nonfinite_steps must be >= 1")
        check(0 <= self.min_lr_ratio <= 1, f"{name}.min_lr_ratio must be in [0, 1]")


@dataclass
class DistributedConfig:
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    offload_optimizer: bool = False
    offload_params: bool = False
    # Signals that ask the run to checkpoint at the next step boundary and exit (to be requeued):
    # Slurm's --signal (USR1/USR2; the launchers use USR2) and the TERM sent on preemption.
    preempt_signals: list = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM"])
    # How long a collective waits for a peer before the rank gives up. It bounds how long the
    # surviving ranks of a job hang when a node dies or hangs; it must exceed the longest time
    # between two collectives in a healthy run (a checkpoint save, an evaluation, the start-up).
    timeout_minutes: float = 30.0
    # Deep-merged last into the generated DeepSpeed config, e.g.
    # {zero_optimization: {stage3_prefetch_bucket_size: 5e8, stage3_max_live_parameters: 1e9}}.
    deepspeed: dict = field(default_factory=dict)

    def validate(self, name: str) -> None:
        check(self.zero_stage in (0, 1, 2, 3), f"{name}.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(not self.offload_params or self.zero_stage == 3,
              f"{name}.offload_params needs {name}.zero_stage=3")
        check(not self.offload_optimizer or self.zero_stage >= 1,
              f"{name}.offload_optimizer needs {name}.zero_stage >= 1")
        check(self.timeout_minutes > 0, f"{name}.timeout_minutes must be > 0, got {self.timeout_minutes}")
        for sig in self.preempt_signals:
            check(isinstance(sig, str) and hasattr(signal, sig.upper()),
                  f"{name}.preempt_signals: '{sig}' is not a signal name; use e.g. SIGUSR1 or SIGTERM")
        zero = self.deepspeed.get("zero_optimization")
        if isinstance(zero, dict) and "stage" in zero:
            check(zero["stage"] == self.zero_stage,
                  f"{name}.deepspeed sets zero_optimization.stage={zero['stage']}; set {name}.zero_stage instead")


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; 0 disables periodic checkpoints
    # Also save when this many minutes passed since the last save (rank 0's clock, agreed at a
    # step boundary so all ranks save at the same step); bounds the work a lost node costs. 0: off.
    every_minutes: float = 0.0
    keep_last: int = 3
    resume: bool = True

    def validate(self, name: str) -> None:
        check(self.every >= 0, f"{name}.every must be >= 0 (0 disables periodic checkpoints)")
        check(self.every_minutes >= 0, f"{name}.every_minutes must be >= 0 (0 disables timed checkpoints)")
        check(self.keep_last >= 1, f"{name}.keep_last must be >= 1")


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0 evaluates only at the end
    zeroshot_dir: str = path_field(kind="dir")
    retrieval_dir: str = path_field(kind="dir")
    batch_size: int = 64
    # Held-out pairs scored by the trainer itself (loss and recall@1): the synthetic source has
    # its own held-out stream; for webdataset data, these shards, else the first caption of each
    # image of retrieval_dir; neither: no held-out loss.
    heldout_shards: str = ""
    heldout_samples: int = 512  # pairs, over all ranks; 0 disables the held-out evaluation
    # Llip: at each evaluation, TensorBoard gets a picture of the mixing weights of this many
    # retrieval_dir images, each with its own captions (eval/mixing/N); 0 disables it.
    mixing_images: int = 1

    def validate(self, name: str) -> None:
        check(self.every >= 0, f"{name}.every must be >= 0")
        check(self.batch_size >= 1, f"{name}.batch_size must be >= 1")
        check(self.heldout_samples >= 0, f"{name}.heldout_samples must be >= 0 (0 disables it)")
        check(self.mixing_images >= 0, f"{name}.mixing_images must be >= 0 (0 disables it)")


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    progress: Literal["auto", "bar", "lines", "none"] = "auto"  # auto: a bar on a TTY, else lines
    # Peak dense FLOP/s of one device, in TFLOP/s, the denominator of the reported MFU. The
    # default is a rough figure for a few CPU cores; use e.g. 989 for an H100/H200 in bf16.
    peak_tflops: float = 0.1

    def validate(self, name: str) -> None:
        check(self.every >= 1, f"{name}.every must be >= 1")
        check(self.peak_tflops > 0, f"{name}.peak_tflops must be > 0")


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 256  # global, over all ranks
    # Samples each rank encodes at once; 0: batch_size / world (no accumulation). Smaller values
    # accumulate batch_size / (world x micro_batch_size) micro-batches into one step whose loss
    # is still the all-pairs loss of the whole global batch (llip_scale.train.step).
    micro_batch_size: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    def validate(self, name: str) -> None:
        check(self.steps >= 1, "steps must be >= 1")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.micro_batch_size >= 0, f"micro_batch_size must be >= 0 (0: batch_size / ranks), "
              f"got {self.micro_batch_size}")
        check(self.micro_batch_size == 0 or self.batch_size % self.micro_batch_size == 0,
              f"micro_batch_size={self.micro_batch_size} does not divide batch_size={self.batch_size}; "
              f"choose a divisor such as {_divisors_text(self.batch_size)}, or 0 for no accumulation")
        run_dir = Path(self.run_dir)
        blocker = next((a for a in (run_dir, *run_dir.parents) if a.exists()), None)
        check(blocker is None or blocker.is_dir(),
              f"run_dir={self.run_dir}: '{blocker}' is an existing file, not a folder; choose another run_dir")


def _divisors_text(n: int, most: int = 8) -> str:
    """The divisors of ``n`` as text, the largest ``most`` of them when there are more."""
    found = [d for d in range(1, n + 1) if n % d == 0]
    shown = found[-most:]
    return ("..., " if len(found) > most else "") + ", ".join(map(str, shown))


def batch_split(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, accum) of ``world_size`` ranks: every rank encodes ``accum``
    micro-batches of ``micro_batch_size`` samples per step, and
    ``batch_size = world_size x micro_batch_size x accum``. A one-line ConfigError naming the
    valid values when the global batch does not split so."""
    check(cfg.batch_size % world_size == 0,
          f"batch_size={cfg.batch_size} is not divisible by the {world_size} ranks; "
          f"set batch_size to a multiple of {world_size}")
    stream_count(cfg.data.streams, cfg.batch_size, world_size)  # the ranks must share the streams evenly
    local = cfg.batch_size // world_size
    micro = cfg.micro_batch_size or local
    check(local % micro == 0,
          f"micro_batch_size={micro} does not divide the per-rank batch {local} (batch_size={cfg.batch_size} "
          f"over {world_size} ranks); set micro_batch_size to one of {_divisors_text(local)}, or 0 for {local}")
    return micro, local // micro


def local_batch_size(cfg: Config, world_size: int) -> int:
    """The per-rank batch of one step (``micro_batch_size x accum``); a ConfigError when the
    global batch does not split evenly over the ranks, their streams and micro-batches (see
    :func:`batch_split`)."""
    micro, accum = batch_split(cfg, world_size)
    return micro * accum


def validate(cfg: Config) -> Config:
    """Run every node's checks and the cross-section checks; return ``cfg``."""
    validate_tree(cfg, "")
    check(cfg.data.context_length in (None, cfg.model.text.context_length),
          f"model.text.context_length={cfg.model.text.context_length} differs from "
          f"data.context_length={cfg.data.context_length}; set both to the same value")
    stream_count(cfg.data.streams, cfg.batch_size, 1)  # batch_size a multiple of data.streams
    if cfg.model.head.bias_init == "batch":  # the saved config shows the value the run starts from
        cfg.model.head.init_logit_bias = -math.log(cfg.batch_size)
    return cfg


def build_config(data: dict) -> Config:
    """Dataclass tree from a plain dict, validated."""
    return validate(from_dict(Config, data))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate.
    When the overrides fail, each is tried on its own so that all wrong ones are reported."""
    data = load_yaml(path) if path else {}
    overrides = overrides or []
    try:
        return build_config(apply_overrides(data, overrides))
    except ConfigError as error:
        wrong = _override_errors(data, overrides) if len(overrides) > 1 else []
        if len(wrong) > 1:
            raise ConfigError(f"{len(wrong)} problems: " + "; ".join(wrong)) from None
        raise error from None


def _override_errors(data: dict, overrides: list[str]) -> list[str]:
    """The distinct errors of the overrides that fail on their own, in order."""
    out = []
    for item in overrides:
        try:
            build_config(apply_overrides(data, [item]))
        except ConfigError as e:
            if str(e) not in out:
                out.append(str(e))
    return out


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (reloadable with :func:`load_config`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
