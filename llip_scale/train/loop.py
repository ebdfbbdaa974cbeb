"""Training entry point: ``llip-train CONFIG [key.path=value ...]`` (also under torchrun).

Flow: YAML + overrides -> validated config (written to ``RUN_DIR/config.yaml``) -> process
group -> data sources checked -> model (``zero.Init`` under ZeRO-3) + AdamW + schedule in a
DeepSpeed engine -> resume from the newest complete checkpoint of ``RUN_DIR`` if any (each rank
takes the saved states of the data streams it reads, from every rank's train state) -> the
loop in :func:`main`: batch -> local images x gathered texts loss (encoded in micro-batches,
:mod:`llip_scale.train.step`) -> agree across ranks
(global loss, non-finite, stop) -> backward + step + logit-scale clamp (or a skipped update)
-> metrics (with ``data.log_keys``, a digest of the global batch's sample keys) -> held-out
evaluation -> checkpoint -> exit on preemption. Rerunning the same command continues an
interrupted run. ``--nproc N`` checks the config for N ranks, then starts
them through torchrun (:mod:`llip_scale.launchers.torchrun`); ``--verify-checkpoint PATH`` checks
a checkpoint's files against the sizes and checksums in its marker. Errors end in one line.

Exit codes: 0 done, 1 training error, 2 bad config, 75 stopped by a signal after saving a
checkpoint (EX_TEMPFAIL: rerun to continue).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import yaml

from llip_scale.checkpoints import store as checkpoint
from llip_scale.checkpoints.reshard import check_world_size
from llip_scale.checkpoints.store import MARKER, ResumeError, list_checkpoints, verify
from llip_scale.config import Config, ConfigError, batch_split, load_config, save_config, to_dict
from llip_scale.data.build import build_loader, check_data, tokenizer_from_config
from llip_scale.data.loader import keys_digest, reshard_state
from llip_scale.data.stream import DataError
from llip_scale.dist.collectives import (
    agree,
    all_gather_objects,
    all_gather_with_grad,
    barrier,
    init_distributed,
    launch_env,
    lost_peer,
    shutdown,
)
from llip_scale.dist.signals import PreemptionFlag, hold, ignore_stop_signals
from llip_scale.eval.periodic import evaluate_run, log_mixing
from llip_scale.launchers.torchrun import run_local
from llip_scale.scale.flops import train_flops_per_sample
from llip_scale.train.engine import clamp_logit_scale, compute_dtype, initialize, step_optimizer
from llip_scale.train.metrics import MetricsWriter, Progress, StepMeter
from llip_scale.train.node import prepare_node
from llip_scale.train.step import forward_step

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_PREEMPTED = 0, 1, 2, 75

log = logging.getLogger("llip_scale.train")


class TrainingError(RuntimeError):
    """The run cannot go on (reported as one line, exit code 1)."""


@dataclass
class TrainState:
    """What the loop itself must carry across a restart (per rank)."""
    step: int = 0  # batches consumed: updates + skipped updates
    updates: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    data: Any = None  # the data state after the last consumed batch
    skipped_samples: dict = field(default_factory=dict)  # reason -> count over all ranks, last logged
    # Losses of the updates since the last logged line: a resumed run logs the same averages.
    pending_losses: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llip-train", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="YAML config file, or the name of a packaged config (e.g. demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.vision.width=64")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--nproc", type=int, default=0, metavar="N",
                   help="start N training processes on this machine (torchrun, standalone)")
    p.add_argument("--verify-checkpoint", metavar="PATH",
                   help="check a checkpoint folder (or every checkpoint of a run folder) byte for byte and exit")
    args = p.parse_args(argv)
    if args.config is None and args.verify_checkpoint is None:
        p.error("the following arguments are required: config")
    return args


def verify_checkpoint(path: str) -> int:
    """``--verify-checkpoint``: one line per checkpoint; exit 1 when any is broken."""
    ok, lines = verify(path)
    print("\n".join(lines), file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_ERROR


def prepare(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cli(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # a log file gets each line as it happens
    args = parse_args(argv)
    if args.verify_checkpoint is not None:
        return verify_checkpoint(args.verify_checkpoint)
    rank, world, _ = launch_env()
    name = "llip-train" if rank == 0 else f"llip-train[rank {rank}]"
    try:
        cfg = prepare(args)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return EXIT_OK
        if args.nproc:
            return spawn(cfg, args, world)
        if rank == 0:
            save_config(cfg, Path(cfg.run_dir) / "config.yaml")
        # Listening from here to the exit: a signal after the last step sets the (unread) flag,
        # then it is ignored; no signal finds the default action (termination) while we exit.
        preempt = PreemptionFlag(cfg.distributed.preempt_signals).install()
        code = main(cfg, preempt)
        ignore_stop_signals()
        return code
    except ConfigError as e:
        print(f"{name}: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:  # e.g. the run folder cannot be written
        print(f"{name}: error: {e}; check the path, its permissions and the free space", file=sys.stderr)
        return EXIT_ERROR
    except DataError as e:  # per rank: each reads its own shards
        print(f"{name}: data error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except RuntimeError as e:
        if not isinstance(e, (TrainingError, ResumeError)):
            raise
        if rank == 0:  # every rank stops on the same agreed condition
            print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def spawn(cfg: Config, args: argparse.Namespace, world: int) -> int:
    """``--nproc N``: check what N ranks need, then start them (torchrun in this process)."""
    if world > 1:
        raise ConfigError(f"--nproc={args.nproc} inside a launcher that already started {world} ranks; "
                          "drop --nproc")
    if args.nproc < 1:
        raise ConfigError(f"--nproc={args.nproc} must be >= 1")
    check_world_size(cfg, args.nproc)
    batch_split(cfg, args.nproc)
    return run_local(args.nproc, args.config, args.overrides)


def setup_logging(rank: int) -> None:
    fmt = "llip-train: %(message)s" if rank == 0 else f"llip-train[rank {rank}]: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("llip_scale")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False


# ---------------------------------------------------------------------------------------------
# helpers of the loop
# ---------------------------------------------------------------------------------------------

def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def skip_update(state: TrainState, cfg: Config) -> None:
    """Count a non-finite loss; stop the run when too many come in a row."""
    state.nonfinite_total += 1
    state.nonfinite_streak += 1
    log.warning("step %d: non-finite loss, update skipped (%d in a row)", state.step + 1, state.nonfinite_streak)
    if state.nonfinite_streak >= cfg.optim.max_nonfinite_steps:
        raise TrainingError(f"the loss was non-finite for {state.nonfinite_streak} consecutive steps (last at step "
                            f"{state.step + 1}); lower optim.lr, set optim.grad_clip, or use distributed.precision=fp32")


def due(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


def timed_save_due(cfg: Config, saved_at: float) -> bool:
    """checkpoint.every_minutes passed since the last save (or the start), by this rank's clock."""
    minutes = cfg.checkpoint.every_minutes
    return minutes > 0 and time.monotonic() - saved_at >= 60 * minutes


def data_counts(batch: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Samples the loaders dropped since the run started, by reason, and object-store reads they
    retried, by kind (both survive resumes), summed over ranks (one collective)."""
    skipped: dict[str, float] = {}
    retries: dict[str, float] = {}
    mine = (dict(getattr(batch, "skipped", {}) or {}), dict(getattr(batch, "retries", {}) or {}))
    for per_rank in all_gather_objects(mine):
        for total, counts in zip((skipped, retries), per_rank):
            for reason, count in counts.items():
                total[reason] = total.get(reason, 0) + count
    return skipped, retries


def global_keys_digest(batch: Any) -> str:
    """The digest of the global batch's sample keys in global order (a collective)."""
    return keys_digest([key for keys in all_gather_objects(list(batch.keys)) for key in keys])


def write_summary(cfg: Config, state: TrainState, final: dict[str, float], status: str) -> dict:
    ckpts = [str(f.path) for f in list_checkpoints(cfg.run_dir) if (f.path / MARKER).is_file()]
    summary = {"status": status, "run_dir": str(cfg.run_dir), "steps": state.step, "updates": state.updates,
               "nonfinite_steps": state.nonfinite_total,
               "tensorboard": str(Path(cfg.run_dir) / "tensorboard") if cfg.logging.tensorboard else None,
               "metrics": str(Path(cfg.run_dir) / "metrics.jsonl"), "checkpoints": ckpts, **final}
    (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def stopped_before_first_step(preempt: PreemptionFlag, state: TrainState, progress: Progress) -> bool:
    """A stop signal that arrived during start-up (from the task's first instant on): every rank
    agrees to stop before training a step. There is nothing new to save (the state is the resumed
    checkpoint's, or the initial one), so the attempt ends at once and the launcher requeues it."""
    hold("before-first-step")
    if not agree(torch.zeros(()), preempt.requested).stop:
        return False
    progress.message(f"stopped by {preempt.received or 'a signal on another rank'} before the first step of this "
                     f"attempt (step {state.step}); nothing new to save; rerun the same command to continue")
    return True


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

def main(cfg: Config, preempt: Optional[PreemptionFlag] = None) -> int:
    """Train ``cfg`` to its last step or to a stop signal. ``preempt``: a flag the caller installed
    (and keeps installed after the return, so no signal finds the default action); without
    one, main installs its own and restores the previous handlers when it returns."""
    env = init_distributed(cfg.distributed.backend, cfg.distributed.timeout_minutes)
    setup_logging(env.rank)
    # Listen from the start: a signal during start-up stops the run after its first step.
    own_flag = preempt is None
    preempt = PreemptionFlag(cfg.distributed.preempt_signals).install() if own_flag else preempt
    try:
        with explain_lost_peer(cfg.distributed.timeout_minutes):
            return _train(cfg, env, preempt)
    finally:
        if own_flag:
            preempt.restore()


@contextlib.contextmanager
def explain_lost_peer(timeout_minutes: float) -> Iterator[None]:
    """A collective that lost a peer, at any point of the run (start-up collectives included),
    ends the rank with one line naming who stopped answering rather than a backend traceback."""
    try:
        yield
    except RuntimeError as e:
        lost = lost_peer(e, timeout_minutes)
        if lost is None:
            raise
        log.error("%s", lost)
        raise TrainingError(lost) from e


def _train(cfg: Config, env: Any, preempt: PreemptionFlag) -> int:
    check_data(cfg)
    tokenizer = tokenizer_from_config(cfg)
    check_world_size(cfg, env.world_size)  # names the world sizes that work
    micro, accum = batch_split(cfg, env.world_size)
    b_local = micro * accum

    prepare_node(env, log.warning)  # once per node: build locks, DeepSpeed ops; then a barrier
    seed_all(cfg.seed)  # the same initial weights on every rank
    engine = initialize(cfg, env)
    seed_all(cfg.seed + 1 + env.rank)  # anything random during training differs per rank
    state = TrainState()
    saved = checkpoint.resume(engine, cfg.run_dir, env, cfg) if cfg.checkpoint.resume else None
    if saved is not None:
        state = TrainState(**saved["train"])
        # Per stream, not per rank: this rank takes the saved states of the streams it reads now.
        state.data = reshard_state(checkpoint.saved_data_states(cfg.run_dir, state.step), env.rank, env.world_size)
    loader = build_loader(cfg, env, tokenizer)
    if state.data is not None:
        loader.load_state_dict(state.data)
    batches = iter(loader)

    flops = train_flops_per_sample(cfg.model, cfg.batch_size, cfg.distributed.activation_checkpointing, accum=accum)
    meter = StepMeter(cfg.batch_size, flops, env.world_size * cfg.logging.peak_tflops * 1e12)
    writer = MetricsWriter(cfg.run_dir, env.is_main, cfg.logging.tensorboard, state.step)
    progress = Progress(cfg.steps, state.step, cfg.logging.progress, env.is_main)
    dtype = compute_dtype(cfg)
    log.info("run %s: %s, %d ranks x %d micro-batches of %d, ZeRO-%d, %s, step %d of %d", cfg.run_dir,
             cfg.model.name, env.world_size, accum, micro, cfg.distributed.zero_stage, cfg.distributed.precision,
             state.step, cfg.steps)

    scale = bias = gnorm = lr = float("nan")
    final: dict[str, float] = {}
    status = "preempted" if stopped_before_first_step(preempt, state, progress) else "done"
    saved_at = time.monotonic()  # rank 0's clock decides timed checkpoints (checkpoint.every_minutes)
    try:
        while state.step < cfg.steps and status == "done":
            # -- one step: local images x all ranks' texts, in `accum` micro-batches --------------
            wait = time.perf_counter()
            batch = next(batches)
            meter.waited(time.perf_counter() - wait)
            images = batch.images.to(env.device, dtype, non_blocking=True)  # [B_local, 3, S, S]
            tokens = batch.tokens.to(env.device, non_blocking=True)  # [B_local, L]
            step = forward_step(engine, images, tokens, accum, gather=all_gather_with_grad, offset=env.rank * b_local)
            # The same decisions on every rank; rank 0's clock decides timed checkpoints.
            verdict = agree(step.loss, preempt.requested, env.is_main and timed_save_due(cfg, saved_at))
            if verdict.nonfinite:
                skip_update(state, cfg)
            else:
                lr = engine.get_lr()[0]  # the rate this update uses
                gnorm = step_optimizer(engine, step.loss, step.more)
                scale, bias = clamp_logit_scale(engine)
                state.updates += 1
                state.nonfinite_streak = 0
                state.pending_losses.append(verdict.loss)
            state.step += 1
            state.data = batch.state
            step = None  # frees the step's feature cache before the next batch is encoded
            meter.stepped()

            # -- metrics ------------------------------------------------------------------------
            keys = {"data/keys_digest": global_keys_digest(batch)} if cfg.data.log_keys else {}
            if due(state.step, cfg.logging.every, cfg.steps):
                state.skipped_samples, retries = data_counts(batch)
                losses = state.pending_losses
                scalars = {"train/loss": sum(losses) / len(losses) if losses else float("nan"),
                           "train/lr": lr, "train/logit_scale": math.exp(scale),
                           "train/logit_bias": bias, "train/grad_norm": gnorm,
                           "train/nonfinite_steps": state.nonfinite_total, **meter.rates(),
                           **{f"data/skipped/{k}": v for k, v in state.skipped_samples.items()},
                           **{f"data/retries/{k}": v for k, v in retries.items()}}
                writer.write(state.step, {**scalars, **keys})
                progress.update(state.step, scalars)
                state.pending_losses = []
            elif keys:
                writer.write(state.step, keys)

            # -- evaluation, checkpoint, preemption ---------------------------------------------
            if due(state.step, cfg.eval.every, cfg.steps) or state.step == cfg.steps:
                final = evaluate_run(engine, cfg, env, tokenizer)
                log_mixing(engine, cfg, env, tokenizer, writer, state.step)
                if final:
                    writer.write(state.step, final)
                    progress.message(f"step {state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
            if (due(state.step, cfg.checkpoint.every, cfg.steps) or verdict.stop or verdict.save
                    or state.step == cfg.steps):
                saved_at = time.monotonic()
                started = time.perf_counter()
                path = checkpoint.save(engine, cfg, state.step,
                                       {"train": asdict(state), "rng": checkpoint.rng_state()}, env)
                # The save time sizes launcher.signal_delay_s (see docs/launching-and-preemption.md).
                progress.message(f"step {state.step}: checkpoint {path} ({time.perf_counter() - started:.1f} s)")
                hold("after-checkpoint")  # a test stops a node here, a complete checkpoint behind it
            if verdict.stop:
                progress.message(f"stopped by {preempt.received or 'a signal on another rank'} at step "
                                 f"{state.step}; rerun the same command to continue")
                status = "preempted"
                break
        if status == "done" and not final:  # resumed at the end: report its numbers again
            final = evaluate_run(engine, cfg, env, tokenizer)
    finally:
        progress.close()
        writer.close()

    if env.is_main:
        write_summary(cfg, state, final, status)
        if status == "done":
            log.info("done: %d steps; run folder %s; final %s", state.step, cfg.run_dir,
                     json.dumps({k: round(v, 4) for k, v in final.items()}))
    barrier()  # leave together: a launcher may stop the other ranks once one has exited
    # Closed here rather than by the interpreter's exit, where the process group's threads are
    # torn down in no set order and a rank could abort ("terminate called without an active
    # exception") after a finished run.
    shutdown()
    return EXIT_PREEMPTED if status == "preempted" else EXIT_OK

