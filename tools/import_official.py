#!/usr/bin/env python
"""Convert a checkpoint of the official Llip release into an llip_scale model.

    tools/import_official.py llip_b16_k32.pt out/llip_b16_k32
    tools/import_official.py llip_G14_k64.pt out/llip_g14 --dtype bf16
    tools/import_official.py custom.pt out/custom --config my_llip.yaml

Accepts the layout of facebookresearch/Llip (open_clip based; see llip_scale/interop/official.py for
every name): the ``CMP`` model with ``visual.class_embedding [K, width]``, fused
``in_proj_weight`` attention, ``k_proj``/``v_proj [K, width, E]``, ``q_proj``/
``text_projection [text width, E]`` applied as ``h @ P``, ``K_norm``/``Q_norm``/``V_norm``,
``pred.out_proj [E, E]`` applied as ``z @ P``, ``logit_scale``, ``logit_bias``; either the
training checkpoint (``{"epoch", "state_dict", ...}``, prefixes ``module.``/``_orig_mod.``) or a
bare state dict. Without ``--config`` the model config is detected from the shapes among the
released ones (B/32 K=64, B/16 K=32, L/14 K=32, H/14 K=64, G/14 K=64, and the
B/32 "all tokens" variant). A checkpoint that does not fit fails with the missing
and unexpected keys listed.

Writes OUT_DIR/model.safetensors (our parameter names), OUT_DIR/config.yaml (loadable with
``llip_scale.config.load_config``; QuickGELU, CLIP BPE end token, tau) and OUT_DIR/inference.yaml
(tokenizer: CLIP BPE from the packaged vocabulary, or a copy of ``--bpe-vocab``; preprocessing).
Load the result with ``llip_scale.create_model_and_transforms(OUT_DIR)`` and
``llip_scale.get_tokenizer(OUT_DIR)``, or ``llip_scale.load_pretrained(OUT_DIR)``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from llip_scale.config import Config, ConfigError, load_config, save_config
from llip_scale.interop import official
from llip_scale.interop.factory import resolve, write_inference_file

DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="import_official.py", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="official checkpoint (.pt)")
    p.add_argument("out_dir", help="folder for model.safetensors and config.yaml")
    p.add_argument("--config", default=None,
                   help="config whose model section matches the checkpoint (default: detect among "
                        f"{', '.join(official.OFFICIAL_CONFIGS)})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="cast floating tensors")
    p.add_argument("--bpe-vocab", default=None,
                   help="another CLIP BPE merges file, copied next to the model (default: the packaged one)")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> tuple[dict, Config]:
    run_cfg = load_config(args.config) if args.config else None
    state, model_cfg = official.import_checkpoint(args.checkpoint, run_cfg.model if run_cfg else None,
                                                  DTYPES[args.dtype])
    if run_cfg is None:
        run_cfg = load_config(f"official/{model_cfg.name}")
    return state, run_cfg


def write(state: dict, cfg: Config, args: argparse.Namespace) -> Path:
    from llip_scale.interop.pretrained import save_weights

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(state, out / "model.safetensors",
                 metadata={"source": Path(args.checkpoint).name, "format": "llip_scale"})
    save_config(cfg, out / "config.yaml")
    if args.bpe_vocab and not Path(args.bpe_vocab).is_file():
        raise ConfigError(f"--bpe-vocab '{args.bpe_vocab}' not found; pass CLIP's bpe_simple_vocab_16e6.txt.gz "
                          "or leave it out (the packaged vocabulary)")
    write_inference_file(out, resolve(out), args.bpe_vocab, require_tokenizer=False)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        state, cfg = convert(args)
        out = write(state, cfg, args)
    except (official.OfficialCheckpointError, ConfigError) as e:
        print(f"import_official.py: {e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in state.values())
    print(f"{args.checkpoint}: {len(state)} tensors, {n / 1e6:,.1f}M parameters -> {out} "
          f"(model '{cfg.model.name}', K={cfg.model.vision.num_tokens}, tau={cfg.model.head.tau:g}, "
          f"{cfg.model.vision.activation})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
