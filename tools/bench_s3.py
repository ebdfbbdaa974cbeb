#!/usr/bin/env python
"""Loader throughput from an S3 server next to local disk and ``pipe:``.

    python tools/bench_s3.py --json benchmarks/s3_cpu.json

Generates the demo-like shard set (64 px JPEG scenes, ``--per-shard`` samples a shard) into a temporary
folder, uploads it to a local moto S3 server (``python -m moto.server`` on 127.0.0.1, started
here; needs ``pip install boto3 "moto[server]"``) and reads it with the training loader from:
local disk, ``pipe:cat`` (a stand-in for ``pipe:aws s3 cp``: no network), S3 directly, and S3
behind the tests' fault proxy adding ``--latency`` seconds before every response's first byte,
each with ``data.prefetch_bytes`` on (64 MiB) and off (0). Reports samples/s and shard bytes/s
(the median over ``--repeats``) after ``--warmup`` batches.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fault proxy of the tests
sys.path.insert(0, str(ROOT / "tools"))

import boto3  # noqa: E402
from bench_loader import BATCH as LOADER_BATCH  # noqa: E402
from bench_loader import make_set  # noqa: E402
from bench_loader import measure as loader_rate  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402

from llip_scale.data import (  # noqa: E402
    DataConfig,
    Tokenizer,
    build_train_loader,
    objects,  # noqa: E402
)
from llip_scale.data.shards import expand_braces  # noqa: E402
from llip_scale.data.tokenizer import train_tokenizer  # noqa: E402

BATCH, BUCKET = LOADER_BATCH, "bench"


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def measure(spec: str, tok: Tokenizer, args: argparse.Namespace, prefetch_bytes: int) -> float:
    cfg = DataConfig(shards=spec, context_length=tok.context_length, workers=args.workers,
                     streams=args.streams, prefetch_bytes=prefetch_bytes)
    loader = build_train_loader(cfg, batch_size=BATCH, rank=0, world_size=1, image_size=64,
                                tokenizer=tok, seed=0)
    return loader_rate(loader, args.batches, args.warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_s3_"))
    local, caps = make_set(tmp / "shards", args.samples, 64, 0, args.per_shard)
    train_tokenizer(caps, str(tmp / "tok.model"), vocab_size=512)
    tok = Tokenizer(str(tmp / "tok.model"), 32)
    paths = expand_braces(local)
    bytes_per_sample = sum(os.path.getsize(p) for p in paths) / args.samples

    moto, endpoint = start_moto()
    proxy = FaultProxy(endpoint)
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
        s3.create_bucket(Bucket=BUCKET)
        for p in paths:
            s3.upload_file(p, BUCKET, Path(p).name)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        s3_spec = f"s3://{BUCKET}/" + Path(local).name
        cases = [("local disk", local, None, 0), ("pipe:cat", f"pipe:cat {local}", None, 0)]
        for prefetch in (64 << 20, 0):
            cases += [(f"s3, prefetch {'on' if prefetch else 'off'}", s3_spec, 0.0, prefetch),
                      (f"s3 +{args.latency * 1000:.0f} ms first byte, prefetch {'on' if prefetch else 'off'}",
                       s3_spec, args.latency, prefetch)]
        rates: dict[str, list[float]] = {name: [] for name, *_ in cases}
        for _ in range(args.repeats):  # alternate the cases, so drifts hit them alike
            for name, spec, latency, prefetch in cases:
                if latency is not None:
                    proxy.latency = latency
                    os.environ["AWS_ENDPOINT_URL"] = proxy.url if latency else endpoint
                    objects._clients.clear()
                rates[name].append(measure(spec, tok, args, prefetch))
                print(f"{name:40s} {rates[name][-1]:8.0f} samples/s", flush=True)
    finally:
        proxy.close()
        moto.terminate()
    base = statistics.median(rates["local disk"])
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "samples": args.samples, "per_shard": args.per_shard, "workers": args.workers,
              "streams": args.streams, "batch": BATCH, "batches": args.batches,
              "bytes_per_sample": round(bytes_per_sample), "latency_s": args.latency, "cases": {}}
    print(f"\n{'source':40s} {'samples/s':>10s} {'MB/s':>8s} {'vs disk':>8s}")
    for name, values in rates.items():
        med = statistics.median(values)
        result["cases"][name] = {"samples_per_s": round(med, 1),
                                 "bytes_per_s": round(med * bytes_per_sample),
                                 "vs_local": round(med / base, 3), "runs": [round(v, 1) for v in values]}
        print(f"{name:40s} {med:10.0f} {med * bytes_per_sample / 1e6:8.2f} {med / base:8.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
