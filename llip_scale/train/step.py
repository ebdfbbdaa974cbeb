"""The loss of one training step, its local batch encoded in micro-batches (gradient accumulation).

A contrastive loss couples every image with every text of the global batch, so it does not split
into per-micro-batch losses whose gradients add up: that would be the loss of several smaller
batches, each with fewer negatives. The step instead caches features, as GradCache (Gao et al.,
2021) and open_clip's ``--accum-freq`` do, and keeps the loss of the whole global batch:

    local batch [micro x accum] ──> micro-batches 1..accum-1 encoded without autograd, the RNG
        state saved before each ──> their features, detached leaves: the cache
    micro-batch 0 encoded with autograd ++ the cache ──> text side all-gathered over ranks
        ──> the pair loss of the whole global batch (the loss the loop agrees on and logs)
    backward of that loss ──> gradients of micro-batch 0's towers, of the head (W_o, logit
        scale and bias: whatever follows the features) and of the cached features (their text
        side summed over ranks by the all-gather's backward, a reduce-scatter)
    for m = 1..accum-1: RNG restored, micro-batch m re-encoded with autograd ──> backward of
        <features_m, cached gradients_m>: micro-batch m's share of the towers' gradients
    one optimizer step (:func:`llip_scale.train.engine.step_optimizer`)

Each pass runs through the model's own forward (``ContrastiveModel.forward``'s ``encode``,
``cached`` and ``feature_grads``), so that ZeRO-3 gathers each module's parameters as usual.
Peak memory is one micro-batch's activations plus the cache (the features of the local batch
and their gradients); the price is one more forward of the towers for all micro-batches but
the first. With ``accum == 1`` the step is the plain forward of the whole local batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import Tensor

Features = tuple[Tensor, ...]


@dataclass
class StepLoss:
    """The step's loss and the further backward passes it needs (none without accumulation)."""
    loss: Tensor
    more: list[Callable[[], Tensor]] = field(default_factory=list)


def rng_state(device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """The generator states a forward may draw from (dropout, drop-path): CPU and this CUDA device."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple[Tensor, Optional[Tensor]], device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def forward_step(model: Callable[..., Any], images: Tensor, tokens: Tensor, accum: int,
                 gather: Optional[Callable[[Tensor], Tensor]] = None, offset: int = 0) -> StepLoss:
    """The loss of the local batch (images [B_local, 3, S, S], tokens [B_local, L]) over the
    global batch, encoded in ``accum`` micro-batches. ``model``: the engine or the plain model."""
    if accum == 1:
        return StepLoss(model(images, tokens, gather=gather, offset=offset))
    if images.shape[0] % accum or tokens.shape[0] != images.shape[0]:
        raise ValueError(f"a local batch of {images.shape[0]} images and {tokens.shape[0]} texts does not split "
                         f"into {accum} micro-batches")
    micro = images.shape[0] // accum
    image_parts, token_parts = images.split(micro), tokens.split(micro)
    states, parts = [], []
    with torch.no_grad():
        for m in range(1, accum):
            states.append(rng_state(images.device))
            parts.append(model(image_parts[m], token_parts[m], encode=True))
    # [micro x (accum - 1), ...] per feature: image side, text side.
    cache = tuple(tuple(torch.cat(f).detach().requires_grad_() for f in zip(*(p[side] for p in parts)))
                  for side in (0, 1))
    loss = model(image_parts[0], token_parts[0], gather=gather, offset=offset, cached=cache)
    end = rng_state(images.device)  # where the last replay leaves the RNG: the next step draws afresh
    # The gradient reaching the loss is the loss scale (fp16) of the backward that follows: the
    # cached gradients come out scaled by it, and so would each replayed pass. The replayed
    # scalars are divided by it instead of the gradients, which would underflow in fp16.
    scale: list[Tensor] = []
    loss.register_hook(lambda grad: scale.append(grad.detach()))
    more = [partial(_replay, model, image_parts[m], token_parts[m], states[m - 1], cache,
                    slice((m - 1) * micro, m * micro), scale, end if m == accum - 1 else None)
            for m in range(1, accum)]
    return StepLoss(loss, more)


def _replay(model: Callable[..., Any], images: Tensor, tokens: Tensor, state: tuple[Tensor, Optional[Tensor]],
            cache: tuple[Features, Features], rows: slice, scale: list[Tensor],
            end: Optional[tuple[Tensor, Optional[Tensor]]]) -> Tensor:
    """Micro-batch ``rows`` of the cache re-encoded with autograd under the RNG state of its
    first pass: the scalar whose backward is the loss's backward through this micro-batch.
    ``end``: the RNG state to leave behind (the last replay)."""
    set_rng_state(state, images.device)
    grads = tuple(tuple(_grad(leaf, rows) for leaf in side) for side in cache)
    surrogate = model(images, tokens, feature_grads=grads)
    if end is not None:
        set_rng_state(end, images.device)
    s = float(scale[0]) if scale else 1.0
    return surrogate if s == 1.0 else surrogate / s


def _grad(leaf: Tensor, rows: slice) -> Tensor:
    return leaf.grad[rows] if leaf.grad is not None else torch.zeros_like(leaf[rows])


def backward(step: StepLoss) -> None:
    """Every backward pass of ``step`` on a plain model (the engine's are in ``step_optimizer``)."""
    step.loss.backward()
    for build in step.more:
        build().backward()
