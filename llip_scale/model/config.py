"""Model config dataclasses: vision tower, text tower, head."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from llip_scale.errors import check

HeadKind = Literal["llip", "siglip", "clip", "registers", "meanpool"]
# MLP activation; "quick_gelu" (x * sigmoid(1.702 x)) is what the official Llip/OpenAI CLIP
# checkpoints were trained with, so imported weights need it to reproduce their features.
Activation = Literal["gelu", "quick_gelu"]
# Init of the transformer blocks: "clip" (normal, scaled with width and depth; what the text
# tower always gets) or "torch" (PyTorch's defaults for nn.MultiheadAttention and nn.Linear:
# what the official Llip vision tower keeps, as its ViT has no init of its own).
BlockInit = Literal["clip", "torch"]
# Projection of the pooled baselines: "shared" (one [width, E] matrix) or "per_token" (one per
# token, [K, width, E], as the official controls: meanpool averages s_k @ P_k, the others use P_0).
PoolProjection = Literal["shared", "per_token"]




@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    num_tokens: int = 32  # K learnable mixture tokens in place of CLS (K=1: a CLS ViT)
    activation: Activation = "gelu"
    block_init: BlockInit = "clip"
    # The official "all tokens" variant: the patch outputs are mixture tokens too, so the head
    # mixes K + grid^2 tokens, each with its own key/value projection.
    all_tokens: bool = False

    def validate(self, name: str) -> None:
        check(self.num_tokens >= 1, f"{name}.num_tokens (K) must be >= 1, got {self.num_tokens}")
        check(self.block_init in ("clip", "torch"), f"{name}.block_init must be 'clip' or 'torch', "
               f"got '{self.block_init}'")
        check(self.image_size % self.patch_size == 0,
               f"{name}.image_size={self.image_size} is not divisible by {name}.patch_size={self.patch_size}")
        check(self.width % self.heads == 0,
               f"{name}.width={self.width} is not divisible by {name}.heads={self.heads}")
        check(min(self.width, self.depth, self.heads, self.mlp_dim) >= 1,
               f"{name}: width, depth, heads and mlp_dim must be >= 1")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_outputs(self) -> int:
        """Tokens the tower outputs, the head's K: the mixture tokens, plus the patches with all_tokens."""
        return self.num_tokens + (self.grid ** 2 if self.all_tokens else 0)


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    eot_id: int = 2  # the text is pooled at its first EOT token
    pad_id: int = 0
    activation: Activation = "gelu"

    def validate(self, name: str) -> None:
        check(self.width % self.heads == 0,
               f"{name}.width={self.width} is not divisible by {name}.heads={self.heads}")
        check(0 <= self.eot_id < self.vocab_size, f"{name}.eot_id must be in [0, vocab_size)")
        check(self.context_length >= 2, f"{name}.context_length must be >= 2")


@dataclass
class HeadConfig:
    kind: HeadKind = "llip"
    embed_dim: int = 512  # E
    num_heads: int = 8  # H, cross-attention heads of the Llip mixing
    tau: float = 5.0  # softmax temperature of the mixing (no 1/sqrt(d))
    use_norm: bool = False  # LayerNorm over E on keys, values and queries
    init_logit_scale: Optional[float] = None  # default: ln(1/0.07) (clip, llip), ln(10) (siglip family)
    init_logit_bias: float = -10.0
    # "fixed": init_logit_bias as given (the release's -10, chosen for 32k batches); "batch":
    # -ln(batch_size), the log-odds of one positive among the batch, so that small batches do not
    # start on the loss plateau of a bias meant for large ones (resolved into init_logit_bias when
    # the run's config is validated).
    bias_init: str = "fixed"
    max_logit_scale: float = math.log(100.0)
    pool_proj: PoolProjection = "shared"  # the pooled baselines' image projection

    def validate(self, name: str) -> None:
        check(self.pool_proj in ("shared", "per_token"),
               f"{name}.pool_proj must be 'shared' or 'per_token', got '{self.pool_proj}'")
        check(self.embed_dim >= 1, f"{name}.embed_dim must be >= 1")
        check(self.num_heads >= 1 and self.embed_dim % self.num_heads == 0,
               f"{name}.embed_dim={self.embed_dim} is not divisible by {name}.num_heads={self.num_heads}")
        check(self.tau > 0, f"{name}.tau must be > 0, got {self.tau}")
        check(self.bias_init in ("fixed", "batch"),
              f"{name}.bias_init must be 'fixed' (init_logit_bias as given) or 'batch' (-ln batch_size), "
              f"got '{self.bias_init}'")

    def logit_scale_init(self) -> float:
        if self.init_logit_scale is not None:
            return self.init_logit_scale
        return math.log(1 / 0.07) if self.kind in ("llip", "clip") else math.log(10.0)


@dataclass
class ModelConfig:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
