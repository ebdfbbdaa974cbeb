#!/usr/bin/env python
"""What the checkpoint checksums cost next to the save itself, at one rank's G/14 checkpoint size.

    python tools/bench_checksum.py [--gb 3] [--dir /tmp] [--repeats 3]

Each repeat writes a ``--gb`` GB state the way a rank saves its shard (``torch.save`` of fp32
tensors into one file, then fsync), then computes the file's CRC-32 as the trainer does after a
save (:func:`llip_scale.checkpoints.store.checksum_files`, reading it back while it is still in the page
cache), and prints the times and the overhead. Record the numbers in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from llip_scale.checkpoints.store import checksum_files


def write_state(path: Path, numel: int) -> float:
    """Seconds to torch.save a state of ``numel`` fp32 values in 256 MB tensors and fsync it."""
    piece = 64 << 20
    state = {f"t{i}": torch.ones(min(piece, numel - i * piece)) for i in range(-(-numel // piece))}
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=3.0, help="size of the state (GB, 1e9 bytes)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write it (the disk under test)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the runs here")
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        for _ in range(args.repeats):
            save_s = write_state(path, int(args.gb * 1e9) // 4)
            start = time.perf_counter()
            checksum_files(path.parent, [path.name])
            crc_s = time.perf_counter() - start
            size = path.stat().st_size
            runs.append({"bytes": size, "save_s": save_s, "crc32_s": crc_s, "overhead": crc_s / save_s})
            print(f"{size / 1e9:.2f} GB: save {save_s:.2f} s, CRC-32 {crc_s:.2f} s ({size / 1e9 / crc_s:.2f} GB/s), "
                  f"overhead {100 * crc_s / save_s:.0f}% of the save", flush=True)
            path.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
