#!/usr/bin/env python
"""Compile the pair kernels for a GPU architecture without a GPU and report their resources.

Triton lowers the kernels to PTX and the bundled ptxas assembles them, so on any machine this
shows whether a specialisation compiles and what it needs per program: registers, spilled bytes
and shared memory. Spills and shared memory decide which block sizes are worth autotuning.

    python tools/kernel_resources.py --chosen --json          # what the backend launches (zoo, bf16)
    python tools/kernel_resources.py                          # a sweep: g14 and b16, bf16, sm_90
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
INTS = ("n_img", "n_txt", "n_tok", "E", "offset", "out_stride", "stat_stride", "split_texts")
FLOATS = ("scale_log2", "inv_tau")


def _signature(fn, constexprs: dict, ptr_type: str, ints: Optional[dict] = None) -> tuple[dict, dict]:
    """Triton signature and specialisation attributes as the JIT derives them at launch: every
    tensor argument 16-byte aligned (the backend passes contiguous tensors and chunk starts
    aligned to 64 texts), and a specialised integer (``ints``: its value) divisible by 16 when it
    is. Without these the loads are compiled element by element, which costs registers that the
    launched kernel does not use."""
    from llip_scale.kernels.pair_kernels import _DYNAMIC

    ints = ints or {}
    sig, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name in POINTERS:
            sig[name] = ptr_type
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "*fp32"
        pointer = sig[name].startswith("*")
        if pointer or (name in ints and name not in _DYNAMIC and ints[name] % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


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
        # The flags Triton's own ptxas call uses (triton/backends/nvidia/compiler.py, make_cubin), so
        # the counts are those of the kernel that runs.
        proc = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", src,
                               "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"error": text.strip().splitlines()[-1] if text.strip() else "ptxas failed"}
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads")}


FWD_MODES = {"scores": 0, "loss": 1, "loss_stats": 2}  # pair_kernels.MODE_*: evaluation, no grad, training


def compile_kernel(kind: str, shape: tuple[int, int, int], dtype_name: str, bt: int, warps: int,
                   stages: int = 2, arch: int = 90, mode: str = "loss_stats") -> dict:
    """Compile one specialisation (``mode``: which forward); returns its resources (or the error)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llip_scale.kernels import pair_kernels as pk
    from llip_scale.kernels.pairs import make_plan

    k, e, h = shape
    dtype = getattr(torch, dtype_name)
    plan = make_plan(k, e, h, dtype)
    if kind == "fwd":
        fn = pk._pairs_fwd_kernel
        constexprs = dict(plan.constexprs(), BT=bt, MODE=FWD_MODES[mode])
    else:
        fn = pk._pairs_bwd_image_kernel if kind == "bwd_image" else pk._pairs_bwd_text_kernel
        constexprs = dict(plan.bwd_constexprs(), BT=bt)
    ptr = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}[dtype_name]
    row = dict(kernel=kind, k=k, e=e, h=h, dtype=dtype_name, bt=bt, warps=warps, stages=stages, arch=arch)
    if kind == "fwd":
        row["mode"] = mode
    start = time.perf_counter()
    try:
        sig, attrs = _signature(fn, constexprs, ptr, ints=dict(n_tok=k, E=e))
        out = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                             target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    except Exception as err:  # a compile failure is a result here, not a crash
        return dict(row, error=str(err).strip().splitlines()[-1][:200])
    row.update(compile_s=round(time.perf_counter() - start, 1), shared_bytes=out.metadata.shared)
    row.update(_ptxas(out.asm["ptx"], arch))
    return row


def format_row(r: dict) -> str:
    kind = r["kernel"] if r["kernel"] != "fwd" else f"fwd/{r['mode']}"
    head = (f"sm_{r['arch']} {kind:14s} K={r['k']:<3d} E={r['e']:<5d} H={r['h']:<2d} {r['dtype']:8s} BT={r['bt']:<3d} "
            f"warps={r['warps']} stages={r['stages']}")
    if "error" in r:
        return f"{head}  error: {r['error']}"
    return (f"{head}  regs={r['registers']:<3d} spill st/ld={r['spill_stores']}/{r['spill_loads']} B  "
            f"shared={r['shared_bytes'] // 1024} KiB  compile {r['compile_s']} s")


def chosen(models: list[str], dtype_name: str, arch: int) -> list[tuple[str, tuple[int, int, int], dict]]:
    """(kernel, shape, config) of every kernel the backend launches for these zoo heads on a GPU
    of this architecture."""
    import torch

    from llip_scale.kernels.pairs import KERNELS, launch_configs, make_plan

    out = []
    dtype = getattr(torch, dtype_name)
    for model in models:
        shape = ZOO[model]
        configs = launch_configs(make_plan(*shape, dtype), torch.empty((), dtype=dtype).element_size(), arch,
                                 interpret=False)
        for kind in KERNELS:
            c = configs[kind]
            out.append((kind, shape, dict(bt=c.bt, warps=c.num_warps, stages=c.num_stages, model=model)))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chosen", action="store_true",
                   help="compile exactly the configs the backend launches for --models "
                        "(ignores --shape, --bt, --warps, --stages)")
    p.add_argument("--models", nargs="+", default=["b16", "l14", "h14", "g14"], choices=sorted(ZOO))
    p.add_argument("--shape", nargs="+", default=None, help="K,E,H triples (default: the zoo's g14 and b16)")
    p.add_argument("--kernels", nargs="+", default=["fwd", "bwd_image", "bwd_text"],
                   choices=["fwd", "bwd_image", "bwd_text"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--bt", nargs="+", type=int, default=[32, 64])
    p.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    p.add_argument("--stages", nargs="+", type=int, default=[2])
    p.add_argument("--fwd-modes", nargs="+", default=["loss_stats"], choices=sorted(FWD_MODES),
                   help="forward specialisations (training: loss_stats; no grad: loss; evaluation: scores)")
    p.add_argument("--arch", nargs="+", type=int, default=[90],
                   help="compute capabilities, e.g. 90 (H100/H200) 80 (A100)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    # Compile for real every time, so that compile_s is the compile time, not a cache hit.
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else [ZOO["g14"], ZOO["b16"]]
    for arch in args.arch:
        if args.chosen:
            jobs = [(kind, shape, cfg["bt"], cfg["warps"], cfg["stages"], cfg["model"])
                    for kind, shape, cfg in chosen(args.models, args.dtype, arch) if kind in args.kernels]
        else:
            jobs = [(kind, shape, bt, warps, stages, None) for shape in shapes for kind in args.kernels
                    for bt in args.bt for warps in args.warps for stages in args.stages]
        for kind, shape, bt, warps, stages, model in jobs:
            for mode in args.fwd_modes if kind == "fwd" else ["-"]:
                row = compile_kernel(kind, shape, args.dtype, bt, warps, stages, arch=arch, mode=mode)
                if model is not None:
                    row = dict(model=model, **row)
                print(json.dumps(row) if args.json else format_row(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
