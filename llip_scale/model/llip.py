"""Llip and its baselines on the same two towers.

Llip:      images -> VisionTransformer -> s [B, K, width] -> per-token k/v projections
           -> keys, values [B, K, E];   tokens -> TextTransformer -> h [B, tw]
           -> queries = h @ W_q, targets = h @ W_text [B, E];   the pair head mixes every image
           for every text and scores it (llip_scale.pairs).
Baselines: one pooled image vector (token 0: ``siglip``/``clip``/``registers``; mean of the K
           tokens: ``meanpool``) projected to E and scored by a dot product.

Inference (open_clip style): ``encode_image`` / ``encode_text`` give the features the head
scores, ``score`` takes features or raw images and tokens, and ``image_embedding`` /
``text_embedding`` give one unit vector per image / text, independent of any caption (Llip:
the image's values mixed with uniform weights, or with one given query, see
:func:`mix_tokens`), for kNN, linear probes or image-to-image search.

Parameters are only read inside the forward of the module that owns them, so the model works
under DeepSpeed ZeRO-3, which gathers a module's parameters just for its own forward; and each
module draws its initial values in its own constructor, as ZeRO-3's ``zero.Init`` partitions a
module's parameters when its constructor returns (see :mod:`llip_scale.model.transformer`).
Distributed training passes ``gather`` (an all-gather with gradient) and the positive
``offset``; this module never imports torch.distributed.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llip_scale.model.config import ModelConfig
from llip_scale.model.text import TextTransformer
from llip_scale.model.transformer import Linear
from llip_scale.model.vision import VisionTransformer
from llip_scale.pairs import clip_loss, pair_loss, pair_scores, sigmoid_loss

Gather = Callable[[Tensor], Tensor]
Features = tuple[Tensor, ...]


def _identity(x: Tensor) -> Tensor:
    return x


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _norm(dim: int, on: bool) -> nn.Module:
    return nn.LayerNorm(dim) if on else nn.Identity()


def _logit_parameter(value: float) -> nn.Parameter:
    """The logit scale or bias, shape [1]: DeepSpeed broadcasts and partitions parameters through
    a flat byte view, which a 0-dim tensor cannot take. The losses take it as ``param[0]``."""
    return nn.Parameter(torch.full((1,), float(value)))


def _read_0dim_logits(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook: exports and checkpoints written while the logit scale and bias
    were 0-dim tensors hold them as such; read those as the [1] tensors they are now."""
    for name in ("logit_scale", "logit_bias"):
        value = state_dict.get(prefix + name)
        if isinstance(value, Tensor) and value.dim() == 0:
            state_dict[prefix + name] = value.reshape(1)


class LlipImageProjection(nn.Module):
    """Per-token projections: key[b, k] = s[b, k] @ W_k[k], value[b, k] = s[b, k] @ W_v[k]."""

    def __init__(self, num_tokens: int, width: int, embed_dim: int, use_norm: bool):
        super().__init__()
        std = width ** -0.5
        self.k_proj = nn.Parameter(std * torch.randn(num_tokens, width, embed_dim))
        self.v_proj = nn.Parameter(std * torch.randn(num_tokens, width, embed_dim))
        self.k_norm = _norm(embed_dim, use_norm)
        self.v_norm = _norm(embed_dim, use_norm)

    def forward(self, s: Tensor) -> tuple[Tensor, Tensor]:
        keys = torch.einsum("bkw,kwe->bke", s, self.k_proj.to(s.dtype))  # [B, K, E]
        values = torch.einsum("bkw,kwe->bke", s, self.v_proj.to(s.dtype))
        return self.k_norm(keys), self.v_norm(values)


def mix_tokens(keys: Tensor, values: Tensor, w_o: Tensor, query: Optional[Tensor], num_heads: int,
               tau: float) -> Tensor:
    """One mixed vector per image, z [B, E]: per head, the values weighted by
    ``softmax_k(<key, query> / tau)`` (or uniformly, ``1/K``, when ``query`` is None), then
    ``@ W_o``. ``query`` is [E] (shared) or [B, E]; keys, values [B, K, E]."""
    b, k, e = values.shape
    d = e // num_heads
    if query is None:
        weights = values.new_full((b, num_heads, k), 1.0 / k)
    else:
        q = query.to(keys.dtype).expand(b, e).reshape(b, num_heads, d)
        logits = torch.einsum("bkhd,bhd->bhk", keys.reshape(b, k, num_heads, d), q)
        weights = torch.softmax(logits / tau, dim=-1)  # [B, H, K]
    mixed = torch.einsum("bhk,bkhd->bhd", weights, values.reshape(b, k, num_heads, d))
    return mixed.reshape(b, e) @ w_o


class LlipPairHead(nn.Module):
    """Owns W_o, logit scale and bias; runs the all-pairs computation in its forward."""

    def __init__(self, cfg: ModelConfig, backend: str = "auto", chunk_size: Optional[int] = None):
        super().__init__()
        e = cfg.head.embed_dim
        self.num_heads, self.tau = cfg.head.num_heads, cfg.head.tau
        self.backend, self.chunk_size = backend, chunk_size
        self.out_proj = nn.Parameter(e ** -0.5 * torch.randn(e, e))  # W_o, applied as mixed @ W_o
        self.logit_scale = _logit_parameter(cfg.head.logit_scale_init())  # [1]
        self.logit_bias = _logit_parameter(cfg.head.init_logit_bias)  # [1]
        self.register_load_state_dict_pre_hook(_read_0dim_logits)

    def forward(self, keys: Tensor, values: Tensor, queries: Optional[Tensor], targets: Optional[Tensor], *,
                offset: int = 0, normalizer: Optional[float] = None, scores: bool = False,
                tau: Optional[float] = None, mix: bool = False) -> Tensor:
        if mix:  # one caption-independent vector per image (W_o is only read inside forward)
            return mix_tokens(keys, values, self.out_proj.to(keys.dtype), queries, self.num_heads, tau or self.tau)
        kw = dict(num_heads=self.num_heads, tau=tau or self.tau, backend=self.backend,
                  chunk_size=self.chunk_size)
        args = (keys, values, self.out_proj.to(keys.dtype), queries, targets, self.logit_scale[0], self.logit_bias[0])
        if scores:
            return pair_scores(*args, **kw)
        return pair_loss(*args, offset=offset, normalizer=normalizer, **kw)


class PooledHead(nn.Module):
    """One image vector: token 0 (siglip, clip, registers) or the mean of the K tokens (meanpool).

    ``pool_proj: per_token`` gives each token its own projection ``P_k`` (the official controls):
    meanpool is then ``mean_k(s_k @ P_k)`` and the others ``s_0 @ P_0``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.head.kind
        w, e = cfg.vision.width, cfg.head.embed_dim
        if cfg.head.pool_proj == "per_token":
            self.proj = nn.Parameter(w ** -0.5 * torch.randn(cfg.vision.num_outputs, w, e))  # [K, width, E]
        else:
            self.proj = Linear(w, e, bias=False, weight=w ** -0.5)
        self.logit_scale = _logit_parameter(cfg.head.logit_scale_init())  # [1]
        # InfoNCE is shift-invariant per row: CLIP has no bias to learn.
        self.logit_bias = None if self.kind == "clip" else _logit_parameter(cfg.head.init_logit_bias)
        self.register_load_state_dict_pre_hook(_read_0dim_logits)

    def pool(self, s: Tensor) -> Tensor:
        if isinstance(self.proj, nn.Linear):
            vec = self.proj(s.mean(dim=1) if self.kind == "meanpool" else s[:, 0])
        elif self.kind == "meanpool":
            vec = torch.einsum("bkw,kwe->be", s, self.proj.to(s.dtype)) / s.shape[1]  # mean_k(s_k P_k)
        else:
            vec = s[:, 0] @ self.proj[0].to(s.dtype)
        return F.normalize(vec, dim=-1)  # [B, E]

    def forward(self, images: Tensor, texts: Tensor, all_images: Optional[Tensor], all_texts: Tensor, *,
                offset: int = 0, normalizer: Optional[float] = None, scores: bool = False) -> Tensor:
        scale = self.logit_scale[0]
        if scores:
            s = scale.exp() * images @ texts.t()
            return s if self.logit_bias is None else s + self.logit_bias[0]
        if self.kind == "clip":
            return clip_loss(images, texts, all_images, all_texts, scale, offset=offset)
        return sigmoid_loss(images, all_texts, scale, self.logit_bias[0], offset=offset, normalizer=normalizer)


class ContrastiveModel(nn.Module):
    """Vision tower + text tower + head (Llip or a pooled baseline)."""

    def __init__(self, cfg: ModelConfig, backend: str = "auto", chunk_size: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        e, tw = cfg.head.embed_dim, cfg.text.width
        self.visual = VisionTransformer(cfg.vision)
        self.text = TextTransformer(cfg.text)
        self.text_projection = Linear(tw, e, bias=False, weight=tw ** -0.5)  # W_text: the targets t
        self.is_llip = cfg.head.kind == "llip"
        if self.is_llip:
            self.image_proj = LlipImageProjection(cfg.vision.num_outputs, cfg.vision.width, e, cfg.head.use_norm)
            self.q_proj = Linear(tw, e, bias=False, weight=tw ** -0.5)  # W_q: the queries
            self.q_norm = _norm(e, cfg.head.use_norm)
            self.head = LlipPairHead(cfg, backend, chunk_size)
        else:
            self.head = PooledHead(cfg)

    # -- encoders ---------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Features:
        """Llip: (keys, values) [B, K, E]; baselines: (unit vector [B, E],)."""
        s = self.visual(images)  # [B, K, width]
        return self.image_proj(s) if self.is_llip else (self.head.pool(s),)

    def encode_text(self, tokens: Tensor) -> Features:
        """Llip: (queries, targets) [B, E]; baselines: (unit vector [B, E],)."""
        h = self.text(tokens)  # [B, text width]
        if self.is_llip:
            return self.q_norm(self.q_proj(h)), self.text_projection(h)
        return (F.normalize(self.text_projection(h), dim=-1),)

    def score(self, images: Tensor | Features, texts: Tensor | Features, tau: Optional[float] = None) -> Tensor:
        """Scores [N_images, N_texts] (the logits of the sigmoid loss; Llip: every image mixed
        for every text by the pair head's backend). ``images``: [N, 3, S, S] or the features of
        ``encode_image``; ``texts``: tokens [M, L] or the features of ``encode_text``."""
        image_features = self.encode_image(images) if isinstance(images, Tensor) else images
        text_features = self.encode_text(texts) if isinstance(texts, Tensor) else texts
        if self.is_llip:
            return self.head(*image_features, *text_features, scores=True, tau=tau)
        return self.head(image_features[0], text_features[0], None, None, scores=True)

    def image_embedding(self, images: Tensor | Features, query: Optional[Tensor] = None,
                        tau: Optional[float] = None) -> Tensor:
        """A caption-independent unit vector per image, [N, E], comparable by cosine with
        ``text_embedding`` and with other images. Llip: the K values mixed with uniform weights
        (``query`` None: every token weighs 1/K in every head) or by one query [E] for all
        images (e.g. the mean of ``encode_text(tokens)[0]`` over a set of captions), then
        ``@ W_o``; baselines: the pooled image vector. ``images``: [N, 3, S, S] or the features
        of ``encode_image``."""
        features = self.encode_image(images) if isinstance(images, Tensor) else images
        if not self.is_llip:
            return features[0]
        return F.normalize(self.head(*features, query, None, mix=True, tau=tau), dim=-1)

    def text_embedding(self, tokens: Tensor) -> Tensor:
        """A unit vector per text, [M, E]: the normalised target (what Llip's mixed image vectors
        are compared with)."""
        return F.normalize(self.encode_text(tokens)[-1], dim=-1)

    # -- training ---------------------------------------------------------------------------
    def forward(self, images: Tensor, tokens: Tensor, gather: Optional[Gather] = None, offset: int = 0, *,
                cached: Optional[tuple[Features, Features]] = None, encode: bool = False,
                feature_grads: Optional[tuple[Features, Features]] = None) -> Tensor | tuple[Features, Features]:
        """Loss of the local batch. ``gather`` all-gathers [B_local, ...] -> [B_global, ...].

        Gradient accumulation (:mod:`llip_scale.train.step`) goes through this forward too, so
        that under ZeRO-3 each module's parameters are gathered by its own forward:
        ``encode=True`` returns the features ``(encode_image, encode_text)`` of the batch;
        ``cached`` holds the features of the rest of the local batch (rows after these ones,
        leaves computed without autograd): the loss is then that of the whole local batch;
        ``feature_grads`` holds gradients of the loss w.r.t. this batch's features: the result
        is ``sum <features, grads>``, whose backward is that of the loss through this batch.
        """
        img = self.encode_image(images)
        txt = self.encode_text(tokens)
        if encode:
            return img, txt
        if feature_grads is not None:  # summed in fp32 at least: only its backward matters, not its size
            pairs = zip((*img, *txt), (*feature_grads[0], *feature_grads[1]))
            return sum((_at_least_fp32(f) * _at_least_fp32(g)).sum() for f, g in pairs)
        if cached is not None:  # this micro-batch first, as in the local batch
            img = tuple(torch.cat(parts) for parts in zip(img, cached[0]))
            txt = tuple(torch.cat(parts) for parts in zip(txt, cached[1]))
        return self.loss_from_features(img, txt, gather, offset)

    def loss_from_features(self, img: Features, txt: Features, gather: Optional[Gather] = None,
                           offset: int = 0) -> Tensor:
        """The pair loss of local image features x all ranks' text features (``gather``)."""
        gather = gather or _identity
        if self.is_llip:
            queries, targets = gather(txt[0]), gather(txt[1])
            return self.head(img[0], img[1], queries, targets, offset=offset)
        all_images = gather(img[0]) if self.head.kind == "clip" else None
        return self.head(img[0], txt[0], all_images, gather(txt[0]), offset=offset)


def build_model(cfg: ModelConfig, backend: str = "auto", chunk_size: Optional[int] = None) -> ContrastiveModel:
    return ContrastiveModel(cfg, backend, chunk_size)
