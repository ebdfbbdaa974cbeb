"""Pre-LayerNorm transformer blocks shared by the vision and text towers.

Every module draws its initial values in its own constructor, from arguments its parent passes
down (``init``: the block init scheme, ``depth``: the tower's depth, which scales the CLIP init).
Under DeepSpeed ZeRO-3 ``zero.Init`` a module's parameters are partitioned as soon as its
constructor returns, so a parent re-initialising a child afterwards would write into an empty
placeholder; drawing each value where it is created keeps a ZeRO-3 build equal to a plain one.
"""
from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llip_scale.model.config import BlockInit

# How a Linear weight starts: "torch" (nn.Linear's default, Kaiming-uniform), "xavier"
# (Xavier-uniform, what nn.MultiheadAttention gives its fused q/k/v weight), or the std of a
# zero-mean normal.
WeightInit = Union[float, Literal["torch", "xavier"]]


class Linear(nn.Linear):
    """``nn.Linear`` whose weight starts from ``weight`` (:data:`WeightInit`) and whose bias starts
    at zero (``zero_bias``) or at nn.Linear's default, uniform in +-1/sqrt(in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight: WeightInit = "torch",
                 zero_bias: bool = False):
        # Set before nn.Linear.__init__, which calls reset_parameters() with them.
        self.weight_init, self.zero_bias = weight, zero_bias
        super().__init__(in_features, out_features, bias)

    def reset_parameters(self) -> None:
        if self.weight_init == "torch":
            super().reset_parameters()  # weight and bias as nn.Linear draws them
        else:
            if self.weight_init == "xavier":
                nn.init.xavier_uniform_(self.weight)
            else:
                nn.init.normal_(self.weight, std=float(self.weight_init))
            if self.bias is not None:
                bound = self.in_features ** -0.5
                nn.init.uniform_(self.bias, -bound, bound)
        if self.bias is not None and self.zero_bias:
            nn.init.zeros_(self.bias)


def block_weight_inits(init: BlockInit, width: int, depth: int) -> tuple[WeightInit, ...]:
    """Weight inits of a block's (q/k/v, attention output, MLP in, MLP out) layers.

    ``clip``: normal, std width^-0.5 for q/k/v, (2 width)^-0.5 for the MLP input, and
    width^-0.5 (2 depth)^-0.5 for the two projections back into the residual stream (CLIP's
    init, scaled with depth). ``torch``: what a block of nn.MultiheadAttention + nn.Linear MLP
    gets from PyTorch itself (what the official Llip vision tower keeps): Xavier-uniform q/k/v,
    nn.Linear's default elsewhere. Attention biases start at zero in both.
    """
    if init == "torch":
        return "xavier", "torch", "torch", "torch"
    proj_std = width ** -0.5 * (2 * depth) ** -0.5
    return width ** -0.5, proj_std, (2 * width) ** -0.5, proj_std


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, in_init: WeightInit = "torch", out_init: WeightInit = "torch"):
        super().__init__()
        self.heads = heads
        self.in_proj = Linear(width, 3 * width, weight=in_init, zero_bias=True)  # fused q, k, v
        self.out_proj = Linear(width, width, weight=out_init, zero_bias=True)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.in_proj(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, heads, N, d]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI CLIP and the official Llip checkpoints."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation_module(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class Block(nn.Module):
    """``depth``: the tower's number of blocks (the CLIP init scales with it)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, activation: str = "gelu", init: BlockInit = "clip",
                 depth: int = 1):
        super().__init__()
        qkv, attn_out, fc, fc_out = block_weight_inits(init, width, depth)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv, attn_out)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", Linear(width, mlp_dim, weight=fc))
        self.mlp.add_module("gelu", activation_module(activation))
        self.mlp.add_module("c_proj", Linear(mlp_dim, width, weight=fc_out))

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_dim: int, activation: str = "gelu",
                 init: BlockInit = "clip"):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(width, heads, mlp_dim, activation, init, depth) for _ in range(depth)])
        self.grad_checkpointing = False  # recompute each block in backward (set by the trainer)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        return x
