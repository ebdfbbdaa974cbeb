"""Training entry point: ``llip-train CONFIG [key.path=value ...]``.

Loads the YAML config, applies the overrides, validates everything before any compute, writes
the resolved config to ``RUN_DIR/config.yaml`` and runs the training loop.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llip_scale.config import Config, ConfigError, load_config, save_config, to_dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llip-train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML config file, or the name of a packaged config (e.g. demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.vision.width=64")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.overrides)
    return cfg


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = prepare(args)
    except ConfigError as e:
        print(f"llip-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    return main(cfg)


def main(cfg: Config) -> int:
    raise SystemExit("llip-train: the training loop is not available in this version")


if __name__ == "__main__":
    sys.exit(cli())
