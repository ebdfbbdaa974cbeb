#!/usr/bin/env python
"""Compile the pair kernels for a GPU architecture without a GPU and report their resources.

Triton lowers the kernels to PTX and the bundled ptxas assembles them, so on any machine this
shows whether a specialisation compiles and what it needs per program: registers, spilled bytes
and shared memory. Spills and shared memory decide which block sizes are worth autotuning.

    python tools/kernel_resources.py --chosen --json          # what the backend launches: zoo heads, every dtype,
                                                              # aligned and unaligned pointers, sm_90 and sm_80
    python tools/kernel_resources.py --gpu-tests              # what the GPU tests and the GPU profile launch
    python tools/kernel_resources.py                          # a sweep: g14 and b16, bf16, sm_90
    python tools/kernel_resources.py --shape 64,1280,8 --bt 32 64 --warps 4 8 --dtype float16

Registers and spills come from the log of Triton's own ptxas call (the ptxas bundled with the
installed Triton, with that version's flags), so they are those of the kernel that would run.
Works with Triton 3.6 to 3.9.
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

# Shapes (K, E, H) of the model zoo's pair heads (configs/models: b32 has b16's head).
ZOO = {"tiny": (8, 128, 4), "b16": (32, 512, 8), "l14": (32, 768, 8), "h14": (64, 1024, 8), "g14": (64, 1280, 8)}
DTYPES = ("bfloat16", "float16", "float32")
# What the GPU tests and the GPU profile launch: (K, E, H, dtype, largest token block or None,
# forward modes), from tests/test_kernel_gpu.py, tests/test_kernel_pairs.py (whose
# small_token_blocks fixture caps the token block at 16) and tools/gpu_check.sh's profile (g14
# and b16 in bf16: forward alone runs the "loss" mode). Training runs "loss_stats"; the forward
# without gradients "loss"; scores "scores".
TRAIN, NO_GRAD = ("loss_stats",), ("loss_stats", "loss")
GPU_TESTS = [(64, 1280, 8, "bfloat16", None, NO_GRAD), (32, 768, 8, "bfloat16", None, TRAIN),
             (32, 512, 8, "float16", None, TRAIN), (32, 512, 8, "float32", None, TRAIN),
             (32, 512, 8, "bfloat16", None, NO_GRAD),
             (5, 32, 2, "float32", 16, TRAIN), (1, 16, 1, "float32", 16, TRAIN), (20, 40, 2, "float32", 16, TRAIN),
             (3, 48, 3, "float32", 16, TRAIN), (5, 32, 2, "float16", 16, TRAIN), (20, 40, 2, "float16", 16, TRAIN),
             (2, 16, 1, "float32", None, TRAIN), (288, 32, 2, "float16", None, TRAIN),
             (3, 32, 2, "float32", None, TRAIN), (5, 32, 2, "float32", None, TRAIN),
             (4, 32, 2, "float32", None, ("loss", "scores")), (8, 128, 4, "float32", None, TRAIN)]
# Pointer arguments that may be unaligned at a launch: slices of the fp32 per-pair buffers
# (stats[0 or 1, i0:i1, t0:], out[i0:i1]) start at byte offsets that are multiples of 16 only when
# Bi x Bt and Bt are multiples of 4. The JIT specialises on each pointer's 16-byte alignment, so
# both variants are compiled: "aligned" (every pointer) and "unaligned" (these three not).
MAYBE_UNALIGNED = ("Out", "Cos", "Nrm")
POINTERS = ("Q", "U", "Kx", "V", "G")
INTS = ("n_img", "n_txt", "n_tok", "E", "offset", "out_stride", "stat_stride", "split_texts")
FLOATS = ("scale_log2", "inv_tau")


def _signature(fn, constexprs: dict, ptr_type: str, ints: Optional[dict] = None,
               unaligned: tuple = ()) -> tuple[dict, dict]:
    """Triton signature and specialisation attributes as the JIT derives them at launch: every
    tensor argument 16-byte aligned except those named in ``unaligned`` (the backend passes
    contiguous tensors and chunk starts aligned to 64 texts; see MAYBE_UNALIGNED), and a
    specialised integer (``ints``: its value) divisible by 16 when it is. Without these the loads
    are compiled element by element, which costs registers that the launched kernel does not use."""
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
        pointer = sig[name].startswith("*") and name not in unaligned
        if pointer or (name in ints and name not in _DYNAMIC and ints[name] % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _parse_ptxas_log(text: str) -> dict:
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack_bytes": num(r"(\d+) bytes stack frame")}


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
    return _parse_ptxas_log(text)


FWD_MODES = {"scores": 0, "loss": 1, "loss_stats": 2}  # pair_kernels.MODE_*: evaluation, no grad, training


def compile_kernel(kind: str, shape: tuple[int, int, int], dtype_name: str, bt: int, warps: int,
                   stages: int = 2, arch: int = 90, mode: str = "loss_stats", aligned: bool = True,
                   max_kc: Optional[int] = None) -> dict:
    """Compile one specialisation (``mode``: which forward; ``aligned``: every pointer 16-byte
    aligned, or not those of MAYBE_UNALIGNED; ``max_kc``: a cap on the token block, as the tests'
    small_token_blocks sets it); returns its resources (or the error)."""
    import contextlib
    import io

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llip_scale.kernels import pair_kernels as pk
    from llip_scale.kernels import pairs as kp

    k, e, h = shape
    dtype = getattr(torch, dtype_name)
    saved = kp.MAX_KC_FP32, kp.MAX_KC_HALF
    if max_kc:
        kp.MAX_KC_FP32, kp.MAX_KC_HALF = max_kc, max_kc
    try:
        plan = kp.make_plan(k, e, h, dtype)
    finally:
        kp.MAX_KC_FP32, kp.MAX_KC_HALF = saved
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
    row.update(kc=plan.kc, aligned=aligned)
    # Triton prints its own ptxas call's log (-v: registers, spills, stack) when asked to.
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    log = io.StringIO()
    start = time.perf_counter()
    try:
        sig, attrs = _signature(fn, constexprs, ptr, ints=dict(n_tok=k, E=e),
                                unaligned=() if aligned else MAYBE_UNALIGNED)
        with contextlib.redirect_stdout(log):
            out = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                                 target=GPUTarget("cuda", arch, 32),
                                 options=dict(num_warps=warps, num_stages=stages))
    except Exception as err:  # a compile failure is a result here, not a crash
        return dict(row, error=str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__)
    row.update(compile_s=round(time.perf_counter() - start, 1), shared_bytes=out.metadata.shared,
               triton=triton.__version__)
    text = log.getvalue()
    if "Used" in text and "registers" in text:
        row.update(_parse_ptxas_log(text), ptxas="triton")
    else:  # a Triton that does not print the log: assemble its PTX again with the bundled ptxas
        row.update(_ptxas(out.asm["ptx"], arch), ptxas="again")
    return row


def format_row(r: dict) -> str:
    kind = r["kernel"] if r["kernel"] != "fwd" else f"fwd/{r['mode']}"
    head = (f"sm_{r['arch']} {kind:14s} K={r['k']:<3d} E={r['e']:<5d} H={r['h']:<2d} {r['dtype']:8s} BT={r['bt']:<3d} "
            f"warps={r['warps']} stages={r['stages']} KC={r.get('kc', '?')} "
            f"{'aligned' if r.get('aligned', True) else 'unaligned'}")
    if "error" in r:
        return f"{head}  error: {r['error']}"
    return (f"{head}  regs={r['registers']:<3d} spill st/ld={r['spill_stores']}/{r['spill_loads']} B  "
            f"shared={r['shared_bytes'] // 1024} KiB  compile {r['compile_s']} s")


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table; a kernel compiled aligned and unaligned with the same
    resources is one line ("both")."""
    merged: dict = {}
    for r in rows:
        key = (r["arch"], r.get("model", ""), r["k"], r["e"], r["h"], r["dtype"], r["kernel"], r.get("mode"), r["bt"],
               r["warps"], r["stages"], r.get("kc"))
        res = ("error", r["error"]) if "error" in r else (r["registers"], r["spill_stores"], r["spill_loads"],
                                                          r["shared_bytes"] // 1024)
        merged.setdefault(key, []).append((r.get("aligned", True), res, r.get("compile_s", "")))
    lines = ["| arch | head (K, E, H) | dtype | kernel | KC | BT | warps | stages | pointers | registers | "
             "spill stores / loads (bytes) | shared KiB | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, variants in merged.items():
        arch, model, k, e, h, dtype, kernel, mode, bt, warps, stages, kc = key
        same = len({v[1] for v in variants}) == 1
        groups = [("both" if len(variants) > 1 else ("aligned" if variants[0][0] else "unaligned"), variants)] if same \
            else [("aligned" if v[0] else "unaligned", [v]) for v in variants]
        for label, vs in groups:
            res = vs[0][1]
            kind = kernel + (f" ({mode})" if mode else "")
            cells = ([str(res[1])] + [""] * 3) if res[0] == "error" else [str(res[0]), f"{res[1]} / {res[2]}", str(res[3])]
            lines.append(f"| sm_{arch} | {model} ({k}, {e}, {h}) | {dtype} | {kind} | {kc} | {bt} | {warps} | {stages} | "
                         f"{label} | " + " | ".join(cells[:3]) + f" | {max(v[2] or 0 for v in vs)} |")
    return "\n".join(lines) + "\n"


def chosen(heads: list[tuple], arch: int) -> list[dict]:
    """Every kernel the backend launches, at its config, for these heads (label, (K, E, H), dtype
    name, token block cap or None, forward modes or None: --fwd-modes) on a GPU of this architecture."""
    import torch

    from llip_scale.kernels import pairs as kp

    out = []
    for label, shape, dtype_name, max_kc, modes in heads:
        saved = kp.MAX_KC_FP32, kp.MAX_KC_HALF
        if max_kc:
            kp.MAX_KC_FP32, kp.MAX_KC_HALF = max_kc, max_kc
        try:
            plan = kp.make_plan(*shape, getattr(torch, dtype_name))
        finally:
            kp.MAX_KC_FP32, kp.MAX_KC_HALF = saved
        configs = kp.launch_configs(plan, dtype_name, arch, interpret=False)
        for kind in kp.KERNELS:
            c = configs[kind]
            out.append(dict(kind=kind, shape=shape, dtype=dtype_name, bt=c.bt, warps=c.num_warps,
                            stages=c.num_stages, model=label, max_kc=max_kc, modes=modes))
    return out


def _run(job: dict) -> dict:
    row = compile_kernel(job["kind"], job["shape"], job["dtype"], job["bt"], job["warps"], job["stages"],
                         arch=job["arch"], mode=job["mode"], aligned=job["aligned"], max_kc=job.get("max_kc"))
    return dict(model=job["model"], **row) if job.get("model") is not None else row


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chosen", action="store_true",
                   help="compile exactly the configs the backend launches for --models "
                        "(ignores --shape, --bt, --warps, --stages)")
    p.add_argument("--models", nargs="+", default=["tiny", "b16", "l14", "h14", "g14"], choices=sorted(ZOO))
    p.add_argument("--gpu-tests", action="store_true",
                   help="compile what the GPU tests and the GPU profile launch (GPU_TESTS), at the chosen configs")
    p.add_argument("--align", choices=["aligned", "unaligned", "both"], default=None,
                   help="pointer alignment variants (default: both with --chosen/--gpu-tests, else aligned)")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--table", default=None, metavar="JSON",
                   help="print the rows of a --json output (JSON lines or a JSON list) as a markdown table and exit")
    p.add_argument("--shape", nargs="+", default=None, help="K,E,H triples (default: the zoo's g14 and b16)")
    p.add_argument("--kernels", nargs="+", default=["fwd", "bwd_image", "bwd_text"],
                   choices=["fwd", "bwd_image", "bwd_text"])
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES),
                   help="default: all three with --chosen, bfloat16 otherwise")
    p.add_argument("--bt", nargs="+", type=int, default=[32, 64])
    p.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    p.add_argument("--stages", nargs="+", type=int, default=[2])
    p.add_argument("--fwd-modes", nargs="+", default=["loss_stats"], choices=sorted(FWD_MODES),
                   help="forward specialisations (training: loss_stats; no grad: loss; evaluation: scores)")
    p.add_argument("--arch", nargs="+", type=int, default=[90],
                   help="compute capabilities, e.g. 90 (H100/H200) 80 (A100)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            text = f.read()
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
        print(markdown_table(rows), end="")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    # Compile for real every time, so that compile_s is the compile time, not a cache hit.
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else [ZOO["g14"], ZOO["b16"]]
    launched = args.chosen or args.gpu_tests
    dtypes = args.dtype or (list(DTYPES) if args.chosen else ["bfloat16"])
    aligns = {"aligned": [True], "unaligned": [False], "both": [True, False]}[args.align or
                                                                            ("both" if launched else "aligned")]
    if args.gpu_tests:
        heads = [(f"test K={k} E={e} H={h}" + (f" KC<={kc}" if kc else ""), (k, e, h), dt, kc, modes)
                 for k, e, h, dt, kc, modes in GPU_TESTS]
    else:
        heads = [(model, ZOO[model], dt, None, None) for dt in dtypes for model in args.models]
    jobs = []
    for arch in args.arch:
        if launched:
            configs = [c for c in chosen(heads, arch) if c["kind"] in args.kernels]
        else:
            configs = [dict(kind=kind, shape=shape, dtype=dt, bt=bt, warps=warps, stages=stages, model=None)
                       for dt in dtypes for shape in shapes for kind in args.kernels
                       for bt in args.bt for warps in args.warps for stages in args.stages]
        jobs += [dict(c, arch=arch, mode=mode, aligned=aligned) for c in configs for aligned in aligns
                 for mode in ((c.get("modes") or args.fwd_modes) if c["kind"] == "fwd" else ["-"])]
    failed = 0
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = pool.map(_run, jobs)
            for row in rows:
                failed += "error" in row
                print(json.dumps(row) if args.json else format_row(row), flush=True)
    else:
        for job in jobs:
            row = _run(job)
            failed += "error" in row
            print(json.dumps(row) if args.json else format_row(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
