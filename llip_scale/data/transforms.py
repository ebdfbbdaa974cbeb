"""Image decode and transforms with PIL and numpy, normalisation with torch.

Flow: image bytes -> :func:`decode_image` (PIL, RGB) -> :func:`train_crop` (RandomResizedCrop,
bicubic, parameters drawn from the stream's generator) or :func:`eval_crop` (resize the short
side, center crop) -> uint8 ``[S, S, 3]`` arrays -> stacked -> :func:`normalize` -> float32
``[B, 3, S, S]`` with the OpenAI CLIP mean and std.
"""
from __future__ import annotations

import io
import math
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = Image.Resampling.BICUBIC


class BadImage(Exception):
    """The bytes are not a decodable image."""


def decode_image(data: bytes) -> Image.Image:
    """RGB image from encoded bytes; raises :class:`BadImage` for anything PIL cannot decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # decode now: PIL is lazy, and a truncated file fails only here
        if img.mode == "RGB":
            return img
        if img.mode in ("P", "LA", "PA") or "transparency" in img.info:
            img = img.convert("RGBA")  # palette transparency needs RGBA first, or PIL warns
        return img.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, ...)
        raise BadImage(f"{type(e).__name__}: {e}") from None


def crop_params(width: int, height: int, rng: np.random.Generator,
                scale: Sequence[float] = (0.9, 1.0),
                ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop box ``(left, top, w, h)``: area fraction in ``scale``, aspect in ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback: the largest centered crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_crop(img: Image.Image, size: int, rng: np.random.Generator,
               scale: Sequence[float] = (0.9, 1.0)) -> np.ndarray:
    """RandomResizedCrop to ``size`` (bicubic): uint8 ``[size, size, 3]``."""
    left, top, w, h = crop_params(img.width, img.height, rng, scale)
    out = img.resize((size, size), BICUBIC, box=(left, top, left + w, top + h))
    return np.asarray(out, dtype=np.uint8)


def eval_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic), center crop: uint8 ``[size, size, 3]``."""
    short = min(img.width, img.height)
    w, h = max(size, round(img.width * size / short)), max(size, round(img.height * size / short))
    if (w, h) != img.size:
        img = img.resize((w, h), BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


_MEAN = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1) * 255
_INV_STD = 1 / (torch.tensor(OPENAI_STD).view(1, 3, 1, 1) * 255)


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` -> float32 ``[B, 3, S, S]``, OpenAI mean/std normalised."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # arrays viewing PIL memory are read-only; torch wants to own it
    # Reorder while still uint8 (4x less memory traffic), then convert and scale in place.
    x = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().float()
    return x.sub_(_MEAN).mul_(_INV_STD)


def eval_image(data: bytes | Image.Image, size: int) -> torch.Tensor:
    """One evaluation image (bytes or PIL) -> float32 ``[3, size, size]``."""
    img = decode_image(data) if isinstance(data, (bytes, bytearray)) else data.convert("RGB")
    return normalize(eval_crop(img, size)[None])[0]


class EvalTransform:
    """open_clip-style ``preprocess_val``: a PIL image or encoded bytes -> float32 ``[3, S, S]``."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: bytes | Image.Image) -> torch.Tensor:
        return eval_image(image, self.image_size)

    def __repr__(self) -> str:
        return f"EvalTransform(resize short side to {self.image_size} (bicubic), center crop, OpenAI mean/std)"


class TrainTransform:
    """open_clip-style ``preprocess_train``: RandomResizedCrop (area ``scale``, bicubic) then the
    OpenAI mean/std, the training loader's augmentation; draws from its own seeded generator."""

    def __init__(self, image_size: int, scale: Sequence[float] = (0.9, 1.0), seed: int | None = None):
        self.image_size, self.scale = image_size, tuple(scale)
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: bytes | Image.Image) -> torch.Tensor:
        img = decode_image(image) if isinstance(image, (bytes, bytearray)) else image.convert("RGB")
        return normalize(train_crop(img, self.image_size, self.rng, self.scale)[None])[0]

    def __repr__(self) -> str:
        return f"TrainTransform(RandomResizedCrop({self.image_size}, scale={self.scale}, bicubic), OpenAI mean/std)"
