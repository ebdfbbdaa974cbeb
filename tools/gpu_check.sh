#!/usr/bin/env bash
# GPU check of the Triton pair kernels: the kernel tests on the GPU, then the profile at the
# G/14 head's target shape (256 x 32,768, bf16); every result lands in one folder, and the
# figures are gathered in OUT_DIR/results.md.
#
#   tools/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_results/
#   PYTHON=/path/to/python tools/gpu_check.sh
#
# Designed to finish in under 8 minutes on one H100/H200. The backend launches one fixed config
# per kernel and shape (no autotuning), and each kernel compiles in well under a minute, so the
# tests and the profile each compile what they run once. Every step has its own time limit,
# taken from what is left of the budget, so a slow step cannot take the others' time.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-gpu_results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
RESULTS="$OUT/results.md"
BUDGET=${GPU_CHECK_BUDGET:-460}  # seconds for the whole script
: > "$LOG"

say() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - SECONDS)); }
# limit SECONDS RESERVE: at most SECONDS, and never into the last RESERVE seconds of the budget
limit() { local l=$(( $(left) - $2 )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 10 ] && l=10; echo "$l"; }

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
DEVICE=$("$PYTHON" -c "import torch, triton; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)" 2>>"$LOG")
say "device: $DEVICE"
unset TRITON_INTERPRET

say "tests (GPU): tests/test_kernel_gpu.py tests/test_kernel_pairs.py"
timeout "$(limit 240 190)" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py tests/test_kernel_pairs.py \
    --junitxml "$OUT/tests.xml" > "$OUT/tests.txt" 2>&1
TESTS_RC=$?
say "tests exit code $TESTS_RC (tail of $OUT/tests.txt:)"
tail -n 5 "$OUT/tests.txt" | tee -a "$LOG"

say "profile: G/14 head, bf16, 256 x 32768, triton and chunked ($(left) s left)"
timeout "$(limit 300 20)" "$PYTHON" tools/profile_pooler.py --device cuda --backends triton chunked \
    --sizes 256x32768 --passes both --timeout "$(limit 120 30)" --out "$OUT/profile" 2>&1 | tee -a "$LOG"
PROFILE_RC=${PIPESTATUS[0]}
say "profile exit code $PROFILE_RC"

{
    echo "# GPU check of the Triton pair kernels"
    echo
    echo "- device: $DEVICE"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- tests (tests/test_kernel_gpu.py tests/test_kernel_pairs.py): exit code $TESTS_RC"
    echo "- profile: exit code $PROFILE_RC; wall time of this script: ${SECONDS} s"
    echo
    echo "## Tests"
    echo
    echo '```'
    tail -n 15 "$OUT/tests.txt"
    echo '```'
    echo
    echo "## Profile (tools/profile_pooler.py, G/14 head, bf16)"
    echo
    if [ -f "$OUT/profile/profile.md" ]; then cat "$OUT/profile/profile.md"; else echo "no profile written"; fi
} > "$RESULTS"
say "done; figures in $RESULTS, everything in $OUT/"
