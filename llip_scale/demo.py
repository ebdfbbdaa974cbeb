"""``make demo``: one forward/backward of the tiny Llip model and its baselines on random data."""
from __future__ import annotations

import time

import torch

from llip_scale.model import build_model, model_config


def main() -> None:
    torch.manual_seed(0)
    cfg = model_config("tiny")
    images = torch.randn(8, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(3, cfg.text.vocab_size, (8, cfg.text.context_length))
    tokens[:, 12] = cfg.text.eot_id
    for kind in ("llip", "siglip", "clip", "registers", "meanpool"):
        model = build_model(model_config("tiny", kind=kind))
        start = time.perf_counter()
        loss = model(images, tokens)
        loss.backward()
        n = sum(p.numel() for p in model.parameters())
        print(f"{kind:10s} params {n / 1e6:6.2f}M  loss {loss.item():8.4f}  "
              f"forward+backward {1e3 * (time.perf_counter() - start):6.1f} ms")


if __name__ == "__main__":
    main()
