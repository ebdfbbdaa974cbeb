"""One raw sample (``{"__key__", ext: bytes}``) -> image bytes and its list of captions.

Captions come from ``key.txt`` and any ``key.*.txt`` (several text files), and from ``key.json``
when it is a list of strings or a mapping with ``captions`` (list) or ``caption`` (string or
list), as img2dataset writes it. Whitespace is collapsed, duplicates dropped, order kept, so the
caption drawn by a seeded generator is the same on every run. Problems raise :class:`SkipSample`
with the reason that the loader counts.
"""
from __future__ import annotations

import json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


class SkipSample(Exception):
    """The sample cannot be used; ``reason`` is the counter it goes into."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise SkipSample("missing_image", "no image file (jpg, png, webp, ...) in the sample")


def _utf8(data: bytes, ext: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipSample("non_utf8_text", f"{ext} is not UTF-8 ({e.reason} at byte {e.start})") from None


def _json_captions(data: bytes) -> list[str]:
    try:
        obj = json.loads(_utf8(data, "json"))
    except json.JSONDecodeError as e:
        raise SkipSample("bad_json", f"json does not parse ({e.msg})") from None
    if isinstance(obj, dict):
        obj = obj.get("captions", obj.get("caption"))
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, list):
        return [c for c in obj if isinstance(c, str)]
    return []


def captions(sample: dict) -> list[str]:
    """Every distinct non-empty caption of the sample, in a fixed order."""
    texts_exts = sorted(k for k in sample if k == "txt" or k.endswith(".txt"))
    found = [_utf8(sample[ext], ext) for ext in texts_exts]
    has_json_captions = False
    if "json" in sample:
        from_json = _json_captions(sample["json"])
        has_json_captions = bool(from_json)
        found += from_json
    if not texts_exts and not has_json_captions:
        raise SkipSample("missing_caption", "no txt file and no captions in json")
    out: list[str] = []
    for text in found:
        clean = " ".join(text.split())
        if clean and clean not in out:
            out.append(clean)
    if not out:
        raise SkipSample("empty_caption", "every caption is empty")
    return out
