"""Pre-LayerNorm transformer blocks shared by the vision and text towers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)  # fused q, k, v
        self.out_proj = nn.Linear(width, width)

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
    def __init__(self, width: int, heads: int, mlp_dim: int, activation: str = "gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_dim))
        self.mlp.add_module("gelu", activation_module(activation))
        self.mlp.add_module("c_proj", nn.Linear(mlp_dim, width))

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_dim: int, activation: str = "gelu"):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(width, heads, mlp_dim, activation) for _ in range(depth)])
        self.grad_checkpointing = False  # recompute each block in backward (set by the trainer)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        return x


def init_transformer(t: Transformer, width: int, depth: int) -> None:
    """CLIP-style init: small projections scaled with depth."""
    proj_std = (width ** -0.5) * ((2 * depth) ** -0.5)
    attn_std = width ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in t.resblocks:
        nn.init.normal_(block.attn.in_proj.weight, std=attn_std)
        nn.init.zeros_(block.attn.in_proj.bias)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(block.attn.out_proj.bias)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


def init_transformer_torch_default(t: Transformer) -> None:
    """The init a block of ``nn.MultiheadAttention`` + ``nn.Linear`` MLP gets from PyTorch itself
    (what the official Llip vision tower keeps): Xavier-uniform fused q/k/v weights, zero
    attention biases; the output projection and the MLP keep nn.Linear's default."""
    for block in t.resblocks:
        nn.init.xavier_uniform_(block.attn.in_proj.weight)
        nn.init.zeros_(block.attn.in_proj.bias)
        nn.init.zeros_(block.attn.out_proj.bias)
