#!/usr/bin/env bash
# GPU check of the Triton pair kernels: the kernel tests on the GPU, then the profile; every
# result lands in one folder.
#
#   tools/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_results/
#   PYTHON=/path/to/python tools/gpu_check.sh
#
# Fits in 8 minutes on one H100/H200. Each kernel specialisation compiles once (tens of seconds
# for the G/14 head's backward), so the tests and the main profile use one fixed block config
# (LLIP_PAIRS_AUTOTUNE=0); the autotuned profile of the target shape runs with the time left.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-gpu_results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for the whole script
: > "$LOG"

say() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - SECONDS)); }

if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PYTHON=.venv/bin/python
    fi
fi
say "python: $PYTHON"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || say "nvidia-smi failed (see $OUT/nvidia-smi.txt)"
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>>"$LOG"; then
    say "no CUDA device visible to $PYTHON: nothing to check"
    exit 1
fi
if ! "$PYTHON" -c "import llip_scale.kernels.pairs" 2>/dev/null; then
    say "llip_scale is not installed for $PYTHON: installing it (editable, no dependencies)"
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || say "install failed"
fi
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
unset TRITON_INTERPRET
export LLIP_PAIRS_AUTOTUNE=0

say "tests (GPU): tests/test_kernel_gpu.py tests/test_kernel_pairs.py"
timeout 210 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py tests/test_kernel_pairs.py \
    --junitxml "$OUT/tests.xml" > "$OUT/tests.txt" 2>&1
say "tests exit code $? (tail of $OUT/tests.txt:)"
tail -n 5 "$OUT/tests.txt" | tee -a "$LOG"

say "profile, fixed block config (G/14 head, bf16)"
timeout $(( $(left) - 90 > 60 ? $(left) - 90 : 60 )) "$PYTHON" tools/profile_pooler.py --device cuda --quick \
    --backends triton chunked reference --timeout 150 --out "$OUT/profile" 2>&1 | tee -a "$LOG"

if [ "$(left)" -gt 80 ]; then
    say "profile, autotuned triton at the target shape ($(left) s left)"
    LLIP_PAIRS_AUTOTUNE=1 timeout $(( $(left) - 10 )) "$PYTHON" tools/profile_pooler.py --device cuda \
        --backends triton --sizes 256x32768 --passes fwd+bwd --timeout $(( $(left) - 15 )) \
        --out "$OUT/profile_autotuned" 2>&1 | tee -a "$LOG"
else
    say "no time left for the autotuned profile"
fi
say "done; results in $OUT/"
