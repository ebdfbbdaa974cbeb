"""FLOP accounting per training sample (one image and one caption), for MFU and planning.

Counts the multiply-adds (MACs) of every matmul, x2 for FLOPs; elementwise work (norms,
softmax, activations) is ignored, as is usual for MFU. Data flow of one sample:

    image -> patch embedding -> vision blocks (grid^2 + K tokens) -> K tokens -> k/v projections
    text  -> text blocks (context_length tokens, full attention counted) -> q / target projections
    pairs -> the image against all ``global_batch`` texts of the step (each rank mixes its
             local images with every gathered text, so one sample costs ``global_batch`` pairs)

Training is forward + backward (backward = 2x forward). Activation checkpointing recomputes
each transformer block in backward; PyTorch's non-reentrant checkpoint stops recomputing once
the tensors backward needs are back, so a block's last matmul (the MLP output projection) is
not redone. The `triton` pair backend, and `chunked` in its plain mode, recompute their forward in
backward, which adds one more forward of the pair work; `chunked` in gram mode computes the
gradients with the loss and recomputes nothing. "Useful" FLOPs for MFU use the pair
definition ``plain`` (K*E logits + K*E mixing + E^2 output projection per pair) whatever the
backend computes; ``gram`` and ``fold`` are the cheaper exact reformulations the backends use.
"""
from __future__ import annotations

from dataclasses import dataclass

from llip_scale.model.config import ModelConfig

PAIR_MODES = ("plain", "gram", "fold")


def transformer_macs(tokens: int, width: int, depth: int, mlp_dim: int, recompute: bool = False) -> float:
    """Forward MACs of ``depth`` pre-LN blocks over ``tokens`` tokens (full attention matrix).

    ``recompute``: the MACs a checkpointed block redoes in backward (all but the MLP output
    projection, whose result backward does not need).
    """
    proj = 4 * tokens * width * width  # q, k, v, out
    attn = 2 * tokens * tokens * width  # scores and mixing
    mlp = (1 if recompute else 2) * tokens * width * mlp_dim
    return float(depth * (proj + attn + mlp))


def _check_mode(mode: str) -> None:
    if mode not in PAIR_MODES:
        raise ValueError(f"unknown pair mode '{mode}'; choose one of {', '.join(PAIR_MODES)}")


def pair_macs(num_tokens: int, embed_dim: int, num_heads: int, mode: str = "plain") -> float:
    """Forward MACs of one (image, text) pair.

    plain: logits K*E + mixing K*E + W_o E^2 (the definition used for "useful" pair FLOPs);
    gram: logits K*E + numerator K*E + norm (H*K)^2; fold: logits K*E + mixing H*K*E.
    """
    _check_mode(mode)
    k, e, h = num_tokens, embed_dim, num_heads
    if mode == "gram":
        return float(2 * k * e + (h * k) ** 2)
    if mode == "fold":
        return float(k * e + h * k * e)
    return float(2 * k * e + e * e)


def pair_setup_macs(num_tokens: int, embed_dim: int, num_heads: int, mode: str = "plain") -> float:
    """Per-sample forward MACs a mode spends once, outside the pair loop.

    gram: fold W_o into the values (K*E^2), the per-image Gram matrix ((H*K)^2*E) and
    U = t @ W_o^T per text (E^2); fold: the folded values (K*E^2); plain: nothing.
    """
    _check_mode(mode)
    k, e, h = num_tokens, embed_dim, num_heads
    if mode == "gram":
        return float(k * e * e + (h * k) ** 2 * e + e * e)
    if mode == "fold":
        return float(k * e * e)
    return 0.0


@dataclass
class SampleFlops:
    """Forward FLOPs of one sample, by part."""
    vision: float
    text: float
    head: float  # the projections: k/v per mixture token, q and the text projection
    pairs: float  # per image, against the whole global batch of texts

    @property
    def encoders(self) -> float:
        return self.vision + self.text + self.head

    @property
    def total(self) -> float:
        return self.vision + self.text + self.head + self.pairs


def vision_macs(cfg: ModelConfig) -> float:
    v = cfg.vision
    patch_embed = v.grid ** 2 * 3 * v.patch_size ** 2 * v.width
    return transformer_macs(v.grid ** 2 + v.num_tokens, v.width, v.depth, v.mlp_dim) + patch_embed


def text_macs(cfg: ModelConfig) -> float:
    t = cfg.text
    return transformer_macs(t.context_length, t.width, t.depth, t.mlp_dim)


def forward_flops(cfg: ModelConfig, global_batch: int, pair_mode: str = "plain") -> SampleFlops:
    """Forward FLOPs of one sample in a step whose global batch is ``global_batch``."""
    v, t, hd = cfg.vision, cfg.text, cfg.head
    if hd.kind == "llip":
        k = v.num_outputs  # the tokens the head mixes (all_tokens: the patches too)
        head = 2 * k * v.width * hd.embed_dim + 2 * t.width * hd.embed_dim
        pairs = global_batch * pair_macs(k, hd.embed_dim, hd.num_heads, pair_mode) + \
            pair_setup_macs(k, hd.embed_dim, hd.num_heads, pair_mode)
    else:
        head = v.width * hd.embed_dim + t.width * hd.embed_dim
        # CLIP scores local images x all texts and local texts x all images: two dot products.
        pairs = global_batch * hd.embed_dim * (2 if hd.kind == "clip" else 1)
    return SampleFlops(2 * vision_macs(cfg), 2 * text_macs(cfg), 2 * float(head), 2 * float(pairs))


def train_flops_per_sample(cfg: ModelConfig, global_batch: int, activation_checkpointing: bool = False,
                           pair_mode: str = "plain", pair_recompute: bool = True, accum: int = 1) -> float:
    """FLOPs one sample costs in a training step (forward, backward, recomputation).

    Encoders: 3x forward, plus the recomputed blocks with activation checkpointing, plus one more
    forward for the samples of all micro-batches but the first with gradient accumulation
    (``accum`` > 1: they are encoded once to cache features, then again with autograd). Llip
    pairs: 3x forward, 4x when the backend recomputes its forward in backward (``triton`` and
    plain-mode ``chunked`` do). Pass ``activation_checkpointing=False, pair_recompute=False,
    accum=1`` for the model FLOPs of MFU, the defaults of the run for the hardware FLOPs actually
    executed.
    """
    f = forward_flops(cfg, global_batch, pair_mode)
    enc = (3 + (accum - 1) / accum) * f.encoders + (2 * recompute_macs(cfg) if activation_checkpointing else 0.0)
    recompute = pair_recompute and cfg.head.kind == "llip"
    return enc + f.pairs * (4 if recompute else 3)


def recompute_macs(cfg: ModelConfig) -> float:
    """MACs activation checkpointing redoes per sample: the blocks of both towers."""
    v, t = cfg.vision, cfg.text
    return transformer_macs(v.grid ** 2 + v.num_tokens, v.width, v.depth, v.mlp_dim, recompute=True) + \
        transformer_macs(t.context_length, t.width, t.depth, t.mlp_dim, recompute=True)


def model_flops_utilization(samples_per_second: float, flops_per_sample: float, num_devices: int,
                            peak_flops_per_device: float) -> float:
    """Achieved FLOP/s over the peak of all devices (a fraction in [0, 1] when sane)."""
    if num_devices < 1 or peak_flops_per_device <= 0:
        raise ValueError("num_devices must be >= 1 and peak_flops_per_device > 0")
    return samples_per_second * flops_per_sample / (num_devices * peak_flops_per_device)


def training_days(total_samples: float, flops_per_sample: float, num_devices: int,
                  peak_flops_per_device: float, mfu: float) -> float:
    """Wall-clock days to see ``total_samples`` at a given MFU."""
    seconds = total_samples * flops_per_sample / (num_devices * peak_flops_per_device * mfu)
    return seconds / 86400.0
