"""Transforms: RandomResizedCrop geometry, eval crop, normalisation, decoding, captions."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llip_scale.data.samples import SkipSample, captions
from llip_scale.data.transforms import (
    OPENAI_MEAN,
    OPENAI_STD,
    BadImage,
    crop_params,
    decode_image,
    eval_crop,
    eval_image,
    normalize,
    train_crop,
)


def test_random_resized_crop_boxes_stay_in_range():
    rng = np.random.default_rng(0)
    for w, h in ((64, 64), (300, 200), (50, 400)):
        for _ in range(200):
            left, top, cw, ch = crop_params(w, h, rng, (0.9, 1.0))
            assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h
            assert 3 / 4 - 0.05 <= cw / ch <= 4 / 3 + 0.05
            if (w, h) == (300, 200):  # aspect fits: the area is always in the scale range
                assert 0.9 * w * h * 0.97 <= cw * ch <= w * h


def test_train_crop_is_bicubic_and_seeded():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    a = train_crop(img, 32, np.random.default_rng(5))
    b = train_crop(img, 32, np.random.default_rng(5))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    left, top, w, h = crop_params(50, 40, np.random.default_rng(5), (0.9, 1.0))
    ref = img.resize((32, 32), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    assert np.array_equal(a, np.asarray(ref))


def test_eval_crop_resizes_the_short_side_then_centers():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 30:50] = 255  # a white band in the middle of a wide image
    out = eval_crop(Image.fromarray(arr), 20)
    assert out.shape == (20, 20, 3)
    assert out[:, 8:12].min() > 200 and out[:, 0].max() < 30 and out[:, -1].max() < 30


def test_normalize_uses_the_openai_statistics():
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    y = normalize(x)
    assert y.shape == (2, 3, 4, 4) and y.dtype == torch.float32
    ref = (torch.tensor(x).permute(0, 3, 1, 2) / 255 - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    assert torch.allclose(y, ref, atol=1e-5)


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_handles_modes_and_rejects_broken_files():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    gray = Image.new("L", (8, 8), 7)
    for img, fmt in ((rgba, "PNG"), (gray, "JPEG"), (rgba, "WEBP"), (gray.convert("P"), "PNG")):
        assert decode_image(_encoded(img, fmt)).mode == "RGB"
    jpeg = _encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    for broken in (b"", b"garbage", jpeg[: len(jpeg) // 2]):
        with pytest.raises(BadImage):
            decode_image(broken)
    assert eval_image(jpeg, 16).shape == (3, 16, 16)


def test_captions_from_txt_files_and_json():
    sample = {"txt": b"a  red\ncircle", "1.txt": b"a blue square",
              "json": json.dumps({"caption": "a red circle", "captions": ["x", "a red circle"]}).encode()}
    assert captions(sample) == ["a blue square", "a red circle", "x"]
    assert captions({"json": json.dumps(["one", "two", ""]).encode()}) == ["one", "two"]
    assert captions({"json": json.dumps({"caption": "only"}).encode()}) == ["only"]
    with pytest.raises(SkipSample) as err:
        captions({"json": b'{"url": "x"}'})
    assert err.value.reason == "missing_caption"
