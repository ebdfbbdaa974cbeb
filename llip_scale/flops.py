"""FLOP accounting per training sample (one image and one caption), for MFU and planning.

Counts multiply-adds of the matmuls (x2 for FLOPs); elementwise work is ignored. Training is
forward + backward (2x forward); activation checkpointing adds one more encoder forward; the
pair head's backends recompute their forward in backward, which is counted as well.
"""
from __future__ import annotations

from dataclasses import dataclass

from llip_scale.model.config import ModelConfig


def transformer_macs(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    """Forward MACs of ``depth`` pre-LN blocks over ``tokens`` tokens."""
    proj = 4 * tokens * width * width  # q, k, v, out
    attn = 2 * tokens * tokens * width  # scores and mixing
    mlp = 2 * tokens * width * mlp_dim
    return float(depth * (proj + attn + mlp))


def pair_macs(num_tokens: int, embed_dim: int, num_heads: int, mode: str = "plain") -> float:
    """Forward MACs of one (image, text) pair.

    plain: logits K*E + mixing K*E + W_o E^2 (the definition used for "useful" pair FLOPs);
    gram: logits K*E + numerator K*E + norm (H*K)^2; fold: logits K*E + mixing H*K*E.
    """
    k, e, h = num_tokens, embed_dim, num_heads
    if mode == "gram":
        return float(2 * k * e + (h * k) ** 2)
    if mode == "fold":
        return float(k * e + h * k * e)
    return float(2 * k * e + e * e)


@dataclass
class SampleFlops:
    vision: float
    text: float
    head: float
    pairs: float  # per image, against the whole global batch of texts

    @property
    def total(self) -> float:
        return self.vision + self.text + self.head + self.pairs


def forward_flops(cfg: ModelConfig, global_batch: int, pair_mode: str = "plain") -> SampleFlops:
    v, t, hd = cfg.vision, cfg.text, cfg.head
    n_img = v.grid ** 2 + v.num_tokens
    vision = transformer_macs(n_img, v.width, v.depth, v.mlp_dim) + v.grid ** 2 * 3 * v.patch_size ** 2 * v.width
    text = transformer_macs(t.context_length, t.width, t.depth, t.mlp_dim)
    if hd.kind == "llip":
        head = 2 * v.num_tokens * v.width * hd.embed_dim + 2 * t.width * hd.embed_dim
        pairs = global_batch * pair_macs(v.num_tokens, hd.embed_dim, hd.num_heads, pair_mode)
    else:
        head = v.width * hd.embed_dim + t.width * hd.embed_dim
        pairs = global_batch * hd.embed_dim
    return SampleFlops(2 * vision, 2 * text, 2 * float(head), 2 * float(pairs))


def train_flops_per_sample(cfg: ModelConfig, global_batch: int, activation_checkpointing: bool = False,
                           pair_mode: str = "plain", pair_recompute: bool = True) -> float:
    """FLOPs one sample costs in a training step (forward, backward, recomputation)."""
    f = forward_flops(cfg, global_batch, pair_mode)
    enc = (f.vision + f.text + f.head) * (4 if activation_checkpointing else 3)
    return enc + f.pairs * (4 if pair_recompute else 3)
