"""Run under torchrun (2 ranks): the distributed loss and gradients vs one process.

For ZeRO stage 0, 3, and 3 with activation checkpointing: build the engine as the trainer does, take the initial weights, run one
step on each rank's half of a fixed global batch (text side all-gathered) and collect the loss
of every rank and every full gradient. Rank 0 then runs the plain model on the whole batch in
one process with the same weights. The step also goes through the logit-scale clamp (the scale
starts above its maximum), and the ZeRO-3 engine is checkpointed, with its gathered weights
saved beside it, for the export test. Results go to OUT/results.pt; the test asserts on them.

usage: torchrun --nproc_per_node 2 tests/_equivalence_worker.py CONFIG OUT
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from llip_scale.checkpoints import store as checkpoint
from llip_scale.config import load_config
from llip_scale.dist.collectives import all_gather_objects, all_gather_with_grad, init_distributed
from llip_scale.model import build_model
from llip_scale.train import engine as E


def global_batch(cfg, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    s, t = cfg.model.vision.image_size, cfg.model.text
    images = torch.randn(n, 3, s, s, generator=g)
    tokens = torch.randint(3, t.vocab_size, (n, t.context_length), generator=g)
    lengths = torch.randint(2, t.context_length, (n,), generator=g)
    tokens[torch.arange(n), lengths] = t.eot_id
    return images, tokens


def master_scale(engine) -> float:
    """The optimizer's fp32 copy of the logit scale (the module parameter where there is none)."""
    from deepspeed.utils import safe_get_full_fp32_param
    p = engine.module.head.logit_scale
    value = safe_get_full_fp32_param(p)
    return float((value if value is not None else p).detach())


def one_stage(config: str, stage: int, env, out: Path, recompute: bool = False) -> dict:
    cfg = load_config(config, [f"distributed.zero_stage={stage}", f"run_dir={out / f'run{stage}'}",
                               f"distributed.activation_checkpointing={recompute}"])
    torch.manual_seed(0)
    engine = E.initialize(cfg, env)
    init = E.full_state_dict(engine)
    images, tokens = global_batch(cfg, cfg.batch_size)
    b = cfg.batch_size // env.world_size
    mine = slice(env.rank * b, (env.rank + 1) * b)

    # A forward whose update is skipped (what the trainer does on a non-finite loss: no
    # backward, no step) must leave the engine as it was; so must an evaluation forward.
    engine(images[mine], tokens[mine], gather=all_gather_with_grad, offset=env.rank * b)
    with torch.no_grad():
        engine.module.encode_image(images[mine])
    loss = engine(images[mine], tokens[mine], gather=all_gather_with_grad, offset=env.rank * b)
    engine.backward(loss)
    grads = E.full_gradients(engine)
    losses = all_gather_objects(float(loss.detach()))
    engine.step()
    clamped = E.clamp_logit_scale(engine)
    result = {"losses": losses, "grads": grads, "init": init, "clamped_step1": clamped,
              "master_step1": master_scale(engine)}
    # A second step: a clamp that missed the optimizer's master copy shows up here.
    loss = engine(images[mine], tokens[mine], gather=all_gather_with_grad, offset=env.rank * b)
    E.step_optimizer(engine, loss)
    result["clamped_step2"] = E.clamp_logit_scale(engine)
    result["master_step2"] = master_scale(engine)
    result["max_logit_scale"] = cfg.model.head.max_logit_scale

    if stage == 3 and not recompute:
        checkpoint.save(engine, cfg, 2, {"train": {"step": 2}, "rng": checkpoint.rng_state()}, env)
        result["weights_after"] = E.full_state_dict(engine)
        result["checkpoint"] = str(checkpoint.checkpoint_root(cfg.run_dir) / checkpoint.step_tag(2))

    if env.is_main:  # the same step in one process, on the concatenated batch
        ref = build_model(cfg.model, backend=cfg.loss.backend, chunk_size=cfg.loss.chunk_size)
        ref.load_state_dict(init)
        ref_loss = ref(images, tokens)
        ref_loss.backward()
        result["ref_loss"] = float(ref_loss.detach())
        result["ref_grads"] = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    return result


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    env = init_distributed("gloo")
    results = {stage: one_stage(config, stage, env, out) for stage in (0, 3)}
    results["3+recompute"] = one_stage(config, 3, env, out, recompute=True)
    if env.is_main:
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main()
