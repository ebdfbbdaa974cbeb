#!/usr/bin/env python
"""Compile the pair kernels for a GPU architecture without a GPU and report their resources.

Triton lowers the kernels to PTX and the bundled ptxas assembles them, so on any machine this
shows whether a specialisation compiles and what it needs per program: registers, spilled bytes
and shared memory. Spills and shared memory decide which block sizes are worth autotuning.

    python tools/kernel_resources.py                          # zoo shapes, bf16, sm_90
    python tools/kernel_resources.py --shape 64,1280,8 --bt 32 64 --warps 4 8 --dtype float16
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Optional

# Shapes (K, E, H) of the model zoo's pair heads.
ZOO = {"tiny": (8, 128, 4), "b16": (32, 512, 8), "l14": (32, 768, 8), "h14": (64, 1024, 8), "g14": (64, 1280, 8)}
POINTERS = ("Q", "U", "Kx", "V", "G")
INTS = ("n_img", "n_txt", "n_tok", "E", "offset", "out_stride", "stat_stride")
FLOATS = ("scale_log2", "inv_tau")


def _signature(fn, constexprs: dict, ptr_type: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = ptr_type
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "*fp32"
    return sig


def _ptxas(ptx: str, arch: int) -> dict:
    """Registers, spills and stack of the assembled kernel (ptxas -v)."""
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")
                  if os.path.exists(os.path.join(bin_dir, n))), "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        proc = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"error": text.strip().splitlines()[-1] if text.strip() else "ptxas failed"}
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads")}


def compile_kernel(kind: str, shape: tuple[int, int, int], dtype_name: str, bt: int, warps: int,
                   stages: int = 2, arch: int = 90) -> dict:
    """Compile one specialisation; returns its resources (or the error)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llip_scale.kernels import pair_kernels as pk
    from llip_scale.kernels.pairs import make_plan

    k, e, h = shape
    dtype = getattr(torch, dtype_name)
    plan = make_plan(k, e, h, dtype)
    fn = pk._pairs_fwd_kernel if kind == "fwd" else pk._pairs_bwd_kernel
    constexprs = dict(plan.constexprs(), BT=bt)
    if kind == "fwd":
        constexprs["MODE"] = pk.MODE_LOSS_STATS
    ptr = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}[dtype_name]
    row = dict(kernel=kind, k=k, e=e, h=h, dtype=dtype_name, bt=bt, warps=warps, stages=stages, arch=arch)
    start = time.perf_counter()
    try:
        out = triton.compile(ASTSource(fn, _signature(fn, constexprs, ptr), constexprs=constexprs),
                             target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    except Exception as err:  # a compile failure is a result here, not a crash
        return dict(row, error=str(err).strip().splitlines()[-1][:200])
    row.update(compile_s=round(time.perf_counter() - start, 1), shared_bytes=out.metadata.shared)
    row.update(_ptxas(out.asm["ptx"], arch))
    return row


def format_row(r: dict) -> str:
    head = f"{r['kernel']:4s} K={r['k']:<3d} E={r['e']:<5d} H={r['h']:<2d} {r['dtype']:8s} BT={r['bt']:<3d} warps={r['warps']} stages={r['stages']}"
    if "error" in r:
        return f"{head}  error: {r['error']}"
    return (f"{head}  regs={r['registers']:<3d} spill st/ld={r['spill_stores']}/{r['spill_loads']} B  "
            f"shared={r['shared_bytes'] // 1024} KiB  compile {r['compile_s']} s")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs="+", default=None, help="K,E,H triples (default: the zoo's g14 and b16)")
    p.add_argument("--kernels", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--bt", nargs="+", type=int, default=[32, 64])
    p.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    p.add_argument("--stages", nargs="+", type=int, default=[2])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else [ZOO["g14"], ZOO["b16"]]
    for shape in shapes:
        for kind in args.kernels:
            for bt in args.bt:
                for warps in args.warps:
                    for stages in args.stages:
                        row = compile_kernel(kind, shape, args.dtype, bt, warps, stages, arch=args.arch)
                        print(json.dumps(row) if args.json else format_row(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
