#!/usr/bin/env python
"""Benchmark the pair computation backends: time, memory and throughput, forward and forward+backward.

Sweeps sizes x backends (``reference``, ``chunked``, ``chunked-compile`` = chunked under
torch.compile, ``triton``) x passes. Each measurement runs in a fresh subprocess so that its peak
memory is not polluted by earlier runs (and an out-of-memory case only loses its own row).

- GPU (``--device cuda``): time is the median of ``triton.testing.do_bench``; memory is
  ``torch.cuda.max_memory_allocated`` above the inputs ("peak"), and above inputs and gradients
  ("extra", the backend's own workspace); throughput counts the useful pair FLOPs
  (``llip_scale.scale.flops.pair_macs``, "plain": logits, mixing and W_o per pair; forward+backward
  = 3x forward) and is also given as a fraction of a dense matmul peak measured on the device.
- CPU (``--device cpu``): the same sweep at CPU sizes; wall-clock median, and the process's peak
  RSS above the inputs (the child runs with MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB: otherwise
  glibc keeps freed multi-MB blocks on its heap and RSS measures allocator caching). ``--quick``
  runs its cases in one child, resetting the peak RSS between them. The triton backend is
  skipped there: the interpreter is for correctness only.

Outputs in ``--out DIR``: profile.json (rows + device + matmul peak, measured before and after the
sweep), profile.md (table) and profile.png (time and memory against the number of pairs);
``--json PATH`` writes the JSON too.

    python tools/profile_pooler.py                                  # full sweep, default device
    python tools/profile_pooler.py --device cpu --quick --out DIR   # a sub-minute CPU sweep
    python tools/profile_pooler.py --device cuda --out gpu_results  # the GPU sweep (G/14 head)
    python tools/profile_pooler.py --json out.json --backends chunked reference
    python tools/profile_pooler.py --memory-plan                   # the triton backend's memory plan
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

ALL_BACKENDS = ["reference", "chunked", "chunked-compile", "triton"]
# (Bi, Bt) per sweep; the head shape of each device's sweep below.
CPU_SIZES = {"full": [(bi, bt) for bi in (64, 256) for bt in (256, 1024, 4096)], "quick": [(16, 128), (16, 512)]}
GPU_SIZES = {"full": [(64, 4096), (256, 8192), (256, 32768)], "quick": [(64, 4096), (256, 32768)]}
CPU_HEAD = dict(k=32, e=512, h=8, dtype="float32")  # B/16's head
GPU_HEAD = dict(k=64, e=1280, h=8, dtype="bfloat16")  # G/14's head
REFERENCE_MAX_FRACTION = 0.4  # skip `reference` where its materialised tensors need more of the device


@dataclass
class Case:
    backend: str
    bi: int
    bt: int
    k: int = 32
    e: int = 512
    h: int = 8
    backward: bool = True
    dtype: str = "float32"
    repeats: int = 3
    device: str = "cpu"
    reference_limit: float = REFERENCE_MAX_FRACTION
    head: str = ""  # the zoo model whose head this is (a label)
    check_repeat: Optional[bool] = None  # two more steps, gradients compared bit for bit (default: on cuda)


def pair_flops(case: Case) -> float:
    """Useful FLOPs of the case (plain per-pair count; forward+backward = 3x forward)."""
    from llip_scale.scale.flops import pair_macs
    return 2.0 * case.bi * case.bt * pair_macs(case.k, case.e, case.h, "plain") * (3 if case.backward else 1)


def reference_bytes(case: Case) -> float:
    """Rough size of what `reference` materialises: attention [Bi,Bt,H,K], mixed and z [Bi,Bt,E], kept for backward."""
    elt = 2 if case.dtype in ("bfloat16", "float16") else 4
    return case.bi * case.bt * (case.h * case.k * 2 + case.e * 3) * elt * (2 if case.backward else 1)


def skip_reason(case: Case, device_bytes: Optional[float]) -> Optional[str]:
    if case.backend == "triton" and case.device == "cpu":
        return "needs CUDA (the interpreter is for correctness only)"
    if case.backend == "reference" and device_bytes and reference_bytes(case) > case.reference_limit * device_bytes:
        return f"would materialise ~{reference_bytes(case) / 2**30:.0f} GiB"
    return None


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0), so that one process can measure several
    cases; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_mb("VmHWM")
        return True
    except OSError:
        return False


def _inputs(case: Case):
    import torch

    torch.manual_seed(0)
    dtype, dev, grad = getattr(torch, case.dtype), torch.device(case.device), case.backward

    def make(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=dev)).to(dtype).requires_grad_(grad)

    return [make(case.bi, case.k, case.e), make(case.bi, case.k, case.e), make(case.e, case.e, scale=case.e ** -0.5),
            make(case.bt, case.e), make(case.bt, case.e),
            torch.tensor(2.0, device=dev, requires_grad=grad), torch.tensor(-10.0, device=dev, requires_grad=grad)]


def _step_fn(case: Case, inputs):
    import torch

    from llip_scale.pairs import pair_loss

    backend = "chunked" if case.backend == "chunked-compile" else case.backend

    def loss_fn(*xs):
        return pair_loss(*xs, num_heads=case.h, tau=5.0, offset=0, backend=backend)

    if case.backend == "chunked-compile":
        loss_fn = torch.compile(loss_fn, dynamic=False)

    def step():
        with torch.set_grad_enabled(case.backward):
            loss = loss_fn(*inputs)
            if case.backward:
                loss.backward()
        return loss

    return step


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _time_cuda(step, grad_to_none) -> tuple[float, str]:
    """Median ms: triton's do_bench, or three timed runs when one run takes over half a second
    (do_bench would repeat a slow backend for minutes)."""
    import torch
    import triton.testing

    def timed() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - start)

    first = timed()
    if first > 500:
        return sorted([first, timed(), timed()])[1], "3"
    return triton.testing.do_bench(step, grad_to_none=grad_to_none, return_mode="median"), "do_bench"


def run_case(case: Case) -> dict:
    """Inside the child process: build inputs, measure peak memory, then time."""
    import gc

    import torch

    gc.collect()  # a previous case in this process must not count as this one's memory
    inputs = _inputs(case)
    step = _step_fn(case, inputs)
    row = dict(asdict(case), inputs_mb=_nbytes(inputs) / 2**20)
    if case.device == "cuda":
        step()  # compile / autotune outside the measurement
        for x in inputs:
            x.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        grads = _nbytes(x.grad for x in inputs if x.grad is not None)
        ms, runs = _time_cuda(step, inputs if case.backward else None)
        row.update(time_ms=ms, peak_mb=peak / 2**20, extra_mb=(peak - grads) / 2**20, runs=runs,
                   device_name=torch.cuda.get_device_name())
    elif reset_peak_rss():
        step()  # warm-up: one-time allocations (thread pools, compiled code) are not the backend's
        gc.collect()
        reset_peak_rss()
        base = _status_mb("VmRSS")
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        row["peak_mb"] = _status_mb("VmHWM") - base
    else:
        base = _max_rss_mb()
        start = time.perf_counter()
        step()  # the first call also measures the peak
        first = time.perf_counter() - start
        row["peak_mb"] = _max_rss_mb() - base
    if case.device != "cuda":
        times = [first]
        while len(times) < case.repeats and sum(times) < 20.0:  # long cases: fewer repeats
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        times.sort()
        row.update(time_ms=1e3 * times[len(times) // 2], runs=len(times), threads=torch.get_num_threads())
    row["tflops"] = pair_flops(case) / (row["time_ms"] * 1e-3) / 1e12
    if case.backward and (case.check_repeat if case.check_repeat is not None else case.device == "cuda"):
        row["repeatable"] = repeatable(step, inputs)
    return row


def repeatable(step, inputs) -> bool:
    """Two more steps from zeroed gradients: the loss and every gradient equal bit for bit."""
    import torch

    runs = []
    for _ in range(2):
        for x in inputs:
            x.grad = None
        loss = step().detach().clone()
        runs.append([loss] + [x.grad.clone() for x in inputs])
    return all(torch.equal(a, b) for a, b in zip(*runs))


def matmul_peak(device: str, dtype: str) -> dict:
    """Inside a child: dense matmul TFLOP/s on this device (the yardstick for the pair kernels)."""
    import torch

    dt = getattr(torch, dtype)
    if device == "cuda":
        import triton.testing

        n = 8192
        a, b = torch.randn(n, n, device="cuda", dtype=dt), torch.randn(n, n, device="cuda", dtype=dt)
        ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
        name = torch.cuda.get_device_name()
    else:
        n = 1024
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        a @ b
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        ms = 1e3 * sorted(times)[2]
        name = f"CPU, {torch.get_num_threads()} threads"
    return dict(device=device, device_name=name, dtype=dtype, n=n, tflops=2 * n ** 3 / (ms * 1e-3) / 1e12,
                total_bytes=torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None)


def _child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return dict(error=(lines or ["failed"])[-1][:300])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(case: Case, timeout: float = 600) -> dict:
    """Run one case in a fresh interpreter and return its result row."""
    out = _child(["--child", json.dumps(asdict(case))], timeout)
    return out if "error" not in out else dict(asdict(case), **out)


def measure_together(cases: list[Case], timeout: float) -> list[dict]:
    """Run CPU cases in one interpreter (a quick sweep: saves a torch import per case), the peak
    RSS reset before each; any failure loses the batch's rows, so full sweeps do not use it."""
    out = _child(["--child-batch", json.dumps([asdict(c) for c in cases])], timeout * len(cases))
    if "error" in out:
        return [dict(asdict(c), **out) for c in cases]
    return out["rows"]


def sweep(cases: list[Case], device_bytes: Optional[float], on_row, together: bool = False,
          timeout: float = 600) -> list[dict]:
    rows = []
    runnable = [c for c in cases if not skip_reason(c, device_bytes)]
    batch = iter(measure_together(runnable, timeout)) if together and runnable else None
    for case in cases:
        reason = skip_reason(case, device_bytes)
        if reason:
            row = dict(asdict(case), skipped=reason)
        else:
            row = next(batch) if batch else measure(case, timeout)
        rows.append(row)
        on_row(row, rows)
    return rows


def _parse_sizes(text: list[str]) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in s.lower().split("x")) for s in text]
    except ValueError:
        raise SystemExit(f"--sizes takes BIxBT pairs such as 256x32768, got {' '.join(text)}") from None


def _parse_head(text: str) -> dict:
    parts = text.split(",")
    if len(parts) != 4:
        raise SystemExit(f"--head takes K,E,H,dtype such as 64,1280,8,bfloat16, got {text}")
    return dict(k=int(parts[0]), e=int(parts[1]), h=int(parts[2]), dtype=parts[3])


def _parse_zoo(text: list[str], dtype: str) -> list[tuple[dict, tuple[int, int]]]:
    """MODEL:BIxBT -> (that zoo model's head in ``dtype``, (Bi, Bt))."""
    from llip_scale.model import model_config

    out = []
    for item in text:
        name, _, size = item.partition(":")
        cfg = model_config(name)
        head = dict(k=cfg.vision.num_tokens, e=cfg.head.embed_dim, h=cfg.head.num_heads, dtype=dtype, head=name)
        out.append((head, _parse_sizes([size])[0]))
    return out


def make_cases(device: str, quick: bool, backends: list[str], sizes=None, head=None, zoo=None) -> list[Case]:
    """Sizes x passes x backends at one head, or (``zoo``: [(head, (Bi, Bt))]) at several heads."""
    repeats = 1 if quick else 3
    if zoo:
        return [Case(backend, bi, bt, backward=backward, repeats=repeats, device=device, **hd)
                for hd, (bi, bt) in zoo for backward in (False, True) for backend in backends]
    sizes = sizes or (GPU_SIZES if device == "cuda" else CPU_SIZES)["quick" if quick else "full"]
    head = head or (GPU_HEAD if device == "cuda" else CPU_HEAD)
    return [Case(backend, bi, bt, backward=backward, repeats=repeats, device=device, **head)
            for bi, bt in sizes for backward in (False, True) for backend in backends]


# -- reporting --------------------------------------------------------------------------------
HEADER = (f"{'backend':15s} {'Bi':>5s} {'Bt':>6s} {'K':>3s} {'E':>5s} {'H':>2s} {'dtype':>8s} {'pass':>8s} "
          f"{'time ms':>10s} {'TFLOP/s':>8s} {'peak MB':>9s} {'repeat':>6s}")


def _pass(r: dict) -> str:
    return "fwd+bwd" if r["backward"] else "fwd"


def format_row(r: dict) -> str:
    head = (f"{r['backend']:15s} {r['bi']:5d} {r['bt']:6d} {r['k']:3d} {r['e']:5d} {r['h']:2d} {r['dtype']:>8s} "
            f"{_pass(r):>8s}")
    if r.get("skipped"):
        return f"{head}  skipped: {r['skipped']}"
    if "error" in r:
        return f"{head}  error: {r['error']}"
    return f"{head} {r['time_ms']:10.1f} {r['tflops']:8.3f} {r['peak_mb']:9.1f} {_repeat(r):>6s}"


def _repeat(r: dict) -> str:
    """Bitwise repeatable gradients: yes, no, or not checked."""
    return {True: "yes", False: "NO"}.get(r.get("repeatable"), "")


def markdown(rows: list[dict], meta: dict) -> str:
    peak = meta.get("matmul_peak") or {}
    after = meta.get("matmul_peak_after") or {}
    lines = [f"Device: {peak.get('device_name', meta['device'])}; dense {peak.get('dtype', '')} matmul "
             f"({peak.get('n', '?')}^3): {peak.get('tflops', float('nan')):.2f} TFLOP/s"
             + (f" before the sweep, {after['tflops']:.2f} after." if after.get("tflops") else "."),
             f"Command: `{meta['command']}`", "",
             "| backend | Bi | Bt | K | E | H | dtype | pass | time ms | pair TFLOP/s | % matmul peak | "
             "peak MiB | extra MiB | extra / inputs | bitwise repeatable |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["backend"] + (f" ({r['head']})" if r.get("head") else ""), r["bi"], r["bt"], r["k"], r["e"], r["h"], r["dtype"], _pass(r)]
        if r.get("skipped") or "error" in r:
            note = f"skipped: {r['skipped']}" if r.get("skipped") else f"error: {r['error']}"
            cells += [note, "", "", "", "", "", ""]
        else:
            frac = 100 * r["tflops"] / peak["tflops"] if peak.get("tflops") else float("nan")
            extra = r.get("extra_mb")
            cells += [f"{r['time_ms']:.1f}", f"{r['tflops']:.3f}", f"{frac:.1f}", f"{r['peak_mb']:.0f}",
                      "" if extra is None else f"{extra:.0f}",
                      "" if extra is None else f"{extra / r['inputs_mb']:.2f}", _repeat(r)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, backward in enumerate((False, True)):
        for backend in ALL_BACKENDS:
            pts = sorted((r["bi"] * r["bt"], r["time_ms"], r["peak_mb"]) for r in rows
                         if r["backend"] == backend and r["backward"] == backward and "time_ms" in r)
            if not pts:
                continue
            x = [p[0] for p in pts]
            axes[0, col].plot(x, [p[1] for p in pts], "o-", label=backend)
            axes[1, col].plot(x, [max(p[2], 1e-3) for p in pts], "o-", label=backend)
        axes[0, col].set_title(("forward+backward" if backward else "forward") + f" ({meta['device']})")
        axes[0, col].set_ylabel("time (ms)")
        axes[1, col].set_ylabel("peak memory above inputs (MiB)")
        axes[1, col].set_xlabel("pairs (Bi x Bt)")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(rows: list[dict], meta: dict, out_dir: Optional[str], json_path: Optional[str]) -> None:
    doc = dict(meta, rows=rows)
    paths = [json_path] if json_path else []
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        paths.append(os.path.join(out_dir, "profile.json"))
        with open(os.path.join(out_dir, "profile.md"), "w") as f:
            f.write(markdown(rows, meta))
        try:
            plot(rows, meta, os.path.join(out_dir, "profile.png"))
        except ImportError:  # matplotlib is optional: the table and the JSON hold every figure
            pass
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)


def memory_plan(bi: int = 256, bt: int = 32768, dtype: str = "bfloat16") -> str:
    """Markdown table of the triton backend's planned extra memory for the model zoo's heads."""
    import torch

    from llip_scale.kernels.pairs import make_plan, plan_chunks, workspace_bytes
    from llip_scale.model import model_config

    dt = getattr(torch, dtype)
    elt = torch.empty((), dtype=dt).element_size()
    lines = [f"Triton backend, Bi={bi} local images x Bt={bt} texts, {dtype}: extra memory beyond inputs and outputs.",
             "", "| head | K | E | H | inputs MiB | images / launch | texts / launch | extra fwd MiB | "
             "extra fwd+bwd MiB | extra / inputs | materialised attention weights GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("b16", "l14", "h14", "g14"):
        cfg = model_config(name)
        k, e, h = cfg.vision.num_tokens, cfg.head.embed_dim, cfg.head.num_heads
        inputs = (2 * bi * k * e + 2 * bt * e + e * e) * elt
        chunks = plan_chunks(bi, bt, make_plan(k, e, h, dt), e, elt)
        fwd, both = workspace_bytes(bi, bt, k, e, h, dt, backward=False), workspace_bytes(bi, bt, k, e, h, dt)
        lines.append(f"| {name} | {k} | {e} | {h} | {inputs / 2**20:.0f} | {chunks.images} | {chunks.texts} | "
                     f"{fwd / 2**20:.0f} | {both / 2**20:.0f} | {both / inputs:.2f} | {bi * bt * h * k * elt / 2**30:.1f} |")
    return "\n".join(lines) + "\n"


def _host_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes, one repeat (CPU: under a minute)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--backends", nargs="+", default=None, choices=ALL_BACKENDS,
                   help="default: all (CPU --quick: reference and chunked; torch.compile takes minutes there)")
    p.add_argument("--out", default=None, help="write profile.json, profile.md and profile.png to this folder")
    p.add_argument("--json", default=None, help="write the rows as JSON to this path")
    p.add_argument("--sizes", nargs="+", default=None, help="BIxBT pairs, e.g. 256x32768 (default: per device)")
    p.add_argument("--head", default=None, help="K,E,H,dtype (default: G/14's head on cuda, B/16's on cpu)")
    p.add_argument("--zoo", nargs="+", default=None, metavar="MODEL:BIxBT",
                   help="cases at the zoo models' heads, e.g. g14:256x32768 b16:256x4096 (in --dtype)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="dtype of the --zoo cases (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--repeat-check", action="store_true",
                   help="also on the CPU: two more forward+backward steps, gradients compared bit for bit")
    p.add_argument("--no-peak-after", action="store_true", help="skip the second matmul measurement (saves time)")
    p.add_argument("--passes", choices=["both", "fwd", "fwd+bwd"], default="both")
    p.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    p.add_argument("--reference-limit", type=float, default=REFERENCE_MAX_FRACTION,
                   help="skip `reference` where it needs more than this fraction of device (host) memory")
    p.add_argument("--memory-plan", action="store_true",
                   help="print the triton backend's planned extra memory for the zoo's heads and exit")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-peak", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-batch", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(Case(**json.loads(args.child)))))
        return 0
    if args.child_batch:
        print(json.dumps({"rows": [run_case(Case(**c)) for c in json.loads(args.child_batch)]}))
        return 0
    if args.child_peak:
        print(json.dumps(matmul_peak(*args.child_peak)))
        return 0
    if args.memory_plan:
        print(memory_plan(), end="")
        return 0
    device = args.device or default_device()
    backends = args.backends or (["reference", "chunked"] if device == "cpu" and args.quick else ALL_BACKENDS)
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    cases = make_cases(device, args.quick, backends, args.sizes and _parse_sizes(args.sizes),
                       args.head and _parse_head(args.head), args.zoo and _parse_zoo(args.zoo, dtype))
    if args.passes != "both":
        cases = [c for c in cases if c.backward == (args.passes == "fwd+bwd")]
    for c in cases:
        c.reference_limit = args.reference_limit
        if args.repeat_check:
            c.check_repeat = True
    peak = _child(["--child-peak", device, cases[0].dtype], args.timeout)
    meta = dict(command=" ".join(["python", "tools/profile_pooler.py", *sys.argv[1:]]), device=device,
                matmul_peak=None if "error" in peak else peak)
    print(f"dense matmul: {peak.get('tflops', float('nan')):.2f} TFLOP/s ({peak.get('device_name', peak)})")
    print(HEADER)

    def on_row(row, rows):
        print(format_row(row), flush=True)
        write_outputs(rows, meta, args.out, args.json)  # partial results survive an interrupted sweep

    together = device == "cpu" and args.quick and reset_peak_rss()
    rows = sweep(cases, peak.get("total_bytes") or (_host_memory() if device == "cpu" else None), on_row, together,
                 args.timeout)
    # Measured again after the sweep: on a shared machine the two bracket the load it ran under.
    if not args.no_peak_after:
        after = _child(["--child-peak", device, cases[0].dtype], args.timeout)
        meta["matmul_peak_after"] = None if "error" in after else after
        print(f"dense matmul after the sweep: {after.get('tflops', float('nan')):.2f} TFLOP/s")
    write_outputs(rows, meta, args.out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
