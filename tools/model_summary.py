#!/usr/bin/env python
"""Parameter counts of a named model size, every size, or the model of a config file, without
allocating weights.

    python tools/model_summary.py g14            # one size
    python tools/model_summary.py all --json     # every size, as JSON
    python tools/model_summary.py b16 --kind siglip
    python tools/model_summary.py configs/official/llip_l14_k32.yaml   # the model a config trains

MODEL takes what tools/plan_memory.py takes: a size's name or a config file.
"""
from __future__ import annotations

import argparse
import json
import sys

from llip_scale.config import load_config
from llip_scale.errors import ConfigError
from llip_scale.model import model_config, model_names
from llip_scale.model.summary import parameter_counts
from llip_scale.model.zoo import size_or_config


def human(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="model_summary.py", description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help=f"a size ({', '.join(model_names())}), 'all', or a config file")
    p.add_argument("--kind", default=None, help="head kind override (llip, siglip, clip, registers, meanpool)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    order = ["tiny", "b32", "b16", "l14", "h14", "g14"]
    every = sorted(model_names(), key=lambda n: (order.index(n) if n in order else len(order), n))
    head = {"kind": args.kind} if args.kind else {}
    try:
        rows = {}
        for arg in args.models:
            for name, path in [(n, None) for n in every] if arg == "all" else [size_or_config(arg)]:
                if path is None:
                    label, cfg = name, model_config(name, **head)
                else:
                    label = path.stem
                    cfg = load_config(path, [f"model.head.kind={args.kind}"] if args.kind else []).model
                rows[label] = dict(parameter_counts(cfg), K=cfg.vision.num_tokens, E=cfg.head.embed_dim,
                                   kind=cfg.head.kind)
    except ConfigError as e:
        print(f"model_summary.py: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    w = max(8, *map(len, rows))
    print(f"{'model':{w}s} {'kind':9s} {'K':>4s} {'E':>5s} {'vision':>9s} {'text':>9s} {'head':>9s} {'total':>9s}")
    for name, r in rows.items():
        print(f"{name:{w}s} {r['kind']:9s} {r['K']:4d} {r['E']:5d} {human(r['vision']):>9s} {human(r['text']):>9s} "
              f"{human(r['head']):>9s} {human(r['total']):>9s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
