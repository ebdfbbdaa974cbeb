"""The pair computation: every image mixed for every text, scored, and the sigmoid loss.

One interface, interchangeable backends (``reference``, ``chunked``, ``triton``):

    pair_loss(keys, values, w_o, queries, targets, logit_scale, logit_bias,
              num_heads=H, tau=tau, offset=rank * B_local)      -> scalar
    pair_scores(keys, values, w_o, queries, targets, logit_scale, logit_bias,
                num_heads=H, tau=tau)                           -> [Bi, Bt]

Shapes: keys, values [Bi, K, E] (local images); w_o [E, E]; queries, targets [Bt, E] (all
texts, targets need not be normalised); logit_scale, logit_bias 0-dim. The positive of image
row i is text column ``offset + i``. The loss is the sum over all Bi x Bt pairs divided by
``normalizer`` (default Bi): averaged over ranks it is the global-batch SigLIP loss.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from llip_scale.pairs.chunked import chunked_loss, chunked_scores
from llip_scale.pairs.config import LossConfig
from llip_scale.pairs.losses import clip_loss, sigmoid_loss
from llip_scale.pairs.reference import reference_loss, reference_scores

__all__ = ["pair_loss", "pair_scores", "register_backend", "resolve_backend", "available_backends",
           "sigmoid_loss", "clip_loss", "LossConfig"]

# The backend table: name -> (loss function, scores function).
_BACKENDS: dict[str, tuple[Callable[..., Tensor], Callable[..., Tensor]]] = {
    "reference": (reference_loss, reference_scores),
    "chunked": (chunked_loss, chunked_scores),
}
# Backends imported on first use, name -> module with ``<name>_loss`` and ``<name>_scores``:
# triton is an optional dependency and slow to import, and the CPU paths never need it.
_ON_DEMAND = {"triton": "llip_scale.kernels.pairs"}


def register_backend(name: str, loss_fn: Callable[..., Tensor], scores_fn: Callable[..., Tensor]) -> None:
    """Add a backend; both functions take the arguments of the reference ones (+ chunk_size)."""
    _BACKENDS[name] = (loss_fn, scores_fn)


def _load(name: str) -> None:
    """Import an on-demand backend into the table (ImportError when its dependency is missing)."""
    if name in _ON_DEMAND and name not in _BACKENDS:
        module = importlib.import_module(_ON_DEMAND[name])
        _BACKENDS[name] = (getattr(module, f"{name}_loss"), getattr(module, f"{name}_scores"))


def available_backends() -> list[str]:
    for name in _ON_DEMAND:
        try:
            _load(name)
        except ImportError:
            pass
    return sorted(_BACKENDS)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is triton on CUDA, chunked elsewhere."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "chunked"
    try:
        _load(backend)
    except ImportError as e:
        raise RuntimeError(f"pair backend '{backend}' is unavailable ({e}); set loss.backend=chunked") from None
    if backend not in _BACKENDS:
        raise ValueError(f"unknown pair backend '{backend}'; choose one of {', '.join(available_backends())}")
    return backend


def _check_shapes(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                  num_heads: int) -> None:
    if keys.dim() != 3 or keys.shape != values.shape:
        raise ValueError(f"keys and values must both be [Bi, K, E]; got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    e = keys.shape[-1]
    if queries.shape[-1] != e or targets.shape != queries.shape or queries.dim() != 2:
        raise ValueError(f"queries and targets must both be [Bt, {e}]; got {tuple(queries.shape)} "
                         f"and {tuple(targets.shape)}")
    if w_o.shape != (e, e):
        raise ValueError(f"w_o must be [{e}, {e}], got {tuple(w_o.shape)}")
    if e % num_heads:
        raise ValueError(f"embedding size {e} is not divisible by num_heads={num_heads}")


def pair_scores(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
                logit_scale: Tensor, logit_bias: Tensor, *, num_heads: int, tau: float,
                backend: str = "auto", chunk_size: Optional[int] = None) -> Tensor:
    """Scores [Bi, Bt] = exp(logit_scale) * cos(z_ij, t_j) + logit_bias for every pair."""
    _check_shapes(keys, values, w_o, queries, targets, num_heads)
    name = resolve_backend(backend, keys.device)
    extra = {} if name == "reference" else {"chunk_size": chunk_size}
    return _BACKENDS[name][1](keys, values, w_o, queries, F.normalize(targets, dim=-1), logit_scale,
                         logit_bias, num_heads=num_heads, tau=tau, **extra)


def pair_loss(keys: Tensor, values: Tensor, w_o: Tensor, queries: Tensor, targets: Tensor,
              logit_scale: Tensor, logit_bias: Tensor, *, num_heads: int, tau: float, offset: int = 0,
              normalizer: Optional[float] = None, backend: str = "auto",
              chunk_size: Optional[int] = None) -> Tensor:
    """Sigmoid loss of local images x all texts, positives at column ``offset + row``."""
    _check_shapes(keys, values, w_o, queries, targets, num_heads)
    bi, bt = keys.shape[0], queries.shape[0]
    if offset < 0 or offset + bi > bt:
        raise ValueError(f"positives at columns [{offset}, {offset + bi}) fall outside the {bt} texts; "
                         "offset must be rank * B_local with all ranks' texts gathered")
    name = resolve_backend(backend, keys.device)
    extra = {} if name == "reference" else {"chunk_size": chunk_size}
    return _BACKENDS[name][0](keys, values, w_o, queries, F.normalize(targets, dim=-1), logit_scale, logit_bias,
                       num_heads=num_heads, tau=tau, offset=offset,
                       normalizer=float(normalizer if normalizer is not None else bi), **extra)
