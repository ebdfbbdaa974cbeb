"""Vision tower: a ViT whose CLS embedding is replaced by K learnable mixture tokens.

images [B, 3, S, S] -> patches [B, grid^2, width] -> prepend K tokens -> + positional embedding
(grid^2 + K positions) -> ln_pre -> transformer -> ln_post on the K token outputs [B, K, width].
Patch outputs are dropped (``all_tokens``: kept, [B, K + grid^2, width], the official "all
tokens" variant); there is no visual projection (the head owns the projections).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from llip_scale.model.config import VisionConfig
from llip_scale.model.transformer import Transformer


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = w ** -0.5
        self.mixture_tokens = nn.Parameter(scale * torch.randn(cfg.num_tokens, w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid ** 2 + cfg.num_tokens, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.activation, cfg.block_init)
        self.ln_post = nn.LayerNorm(w)

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, grid^2, width]
        tokens = self.mixture_tokens.to(x.dtype).expand(x.shape[0], -1, -1)  # [B, K, width]
        x = torch.cat([tokens, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, : self.cfg.num_outputs])  # [B, K, width] (all_tokens: K + grid^2)
