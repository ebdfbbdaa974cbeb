"""Text tower: CLIP-style causal transformer pooled at the EOT token.

tokens [B, L] -> token + positional embedding -> causal transformer -> ln_final -> the row at
the first EOT token of each text (the last position if a text has none) -> h [B, width].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from llip_scale.model.config import TextConfig
from llip_scale.model.transformer import Transformer


def eot_positions(tokens: Tensor, eot_id: int) -> Tensor:
    """Index of the first EOT in each row; the last index where a row has none (truncated)."""
    is_eot = tokens == eot_id
    first = is_eot.int().argmax(dim=1)
    return torch.where(is_eot.any(dim=1), first, torch.full_like(first, tokens.shape[1] - 1))


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose rows start normal with ``std`` (CLIP's 0.02) instead of 1."""

    def __init__(self, num_embeddings: int, dim: int, std: float):
        self.std = std  # set before nn.Embedding.__init__, which calls reset_parameters() with it
        super().__init__(num_embeddings, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = Embedding(cfg.vocab_size, cfg.width, std=0.02)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.activation, "clip")
        self.ln_final = nn.LayerNorm(cfg.width)

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        if n > self.cfg.context_length:
            raise ValueError(f"text has {n} tokens, more than context_length={self.cfg.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x, causal=True))
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return x[rows, eot_positions(tokens, self.cfg.eot_id)]  # [B, width]
