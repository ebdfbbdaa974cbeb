#!/usr/bin/env bash
# GPU check of the Triton pair kernels, one run, one verdict: the kernel tests on the GPU, then
# the profile of the triton and chunked backends at the G/14 head (bf16, 256 x 32,768) and the
# B/16 head (bf16, 256 x 4,096). The last line is "PASS: ..." (exit 0) or "FAIL: <reason>"
# (exit 1), and every figure lands in OUT_DIR/results.md.
#
#   tools/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_results/
#   PYTHON=/path/to/python tools/gpu_check.sh OUT_DIR
#
# Nothing is installed: the checkout is imported in place (PYTHONPATH holds the repository and
# tools/source_tree, whose sitecustomize maps kernels/, launchers/ and configs/ into the package
# the way the editable install does). It fails, with one line, when
#   - no CUDA device is visible, or a module the check needs does not import from this checkout;
#   - any kernel test fails, errors or is skipped (LLIP_REQUIRE_GPU_KERNELS=1 turns skips into
#     failures, and the junit XML is checked for skips as well), or no test ran;
#   - a profile row is missing or failed, or the triton gradients differ between two runs;
#   - a step runs past its own limit.
# Budget: GPU_CHECK_BUDGET seconds in all (default 330, under 6 minutes with compiles), and each
# step's limit is taken from what is left, so a slow step cannot take the others' time.
# OUT_DIR gets results.md (everything measured, and the verdict), gpu_check.log (this script's
# log and the profile's output), tests.txt (pytest's output), tests_gpu.xml and tests_pairs.xml
# (junit) and profile.json.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUT="${1:-gpu_results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
BUDGET=${GPU_CHECK_BUDGET:-330}
PYTHON=${PYTHON:-python3}
: > "$LOG"
rm -f "$OUT/results.md" "$OUT"/tests*.txt "$OUT"/tests*.xml "$OUT/profile.json"

export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT:$ROOT/tools/source_tree${PYTHONPATH:+:$PYTHONPATH}"
export LLIP_REQUIRE_GPU_KERNELS=1
unset TRITON_INTERPRET

say() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - SECONDS)); }
# limit MOST RESERVE: at most MOST seconds, and never into the last RESERVE seconds of the budget
limit() { local l=$(( $(left) - $2 )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo "$l"; }
STEPS=()
# step NAME LIMIT CMD...: run CMD under LIMIT seconds, output to the log; records NAME:RC:SECONDS:LIMIT
step() {
    local name=$1 lim=$2 start=$SECONDS rc
    shift 2
    say "$name (limit ${lim} s, $(left) s left)"
    timeout -k 10 "$lim" "$@" >> "$LOG" 2>&1
    rc=$?
    STEPS+=("$name:$rc:$((SECONDS - start)):$lim")
    say "$name: exit code $rc after $((SECONDS - start)) s"
    return $rc
}
fail() { say "FAIL: $*"; echo "FAIL: $*" >&2; exit 1; }

say "python: $PYTHON; budget ${BUDGET} s"
{ nvidia-smi 2>&1 || echo "nvidia-smi failed"; } | sed 's/^/  nvidia-smi: /' >> "$LOG"
PRE=$(timeout -k 5 "$(limit 90 240)" "$PYTHON" -u tools/gpu_check.py preflight 2>>"$LOG")
PRE_RC=$?
echo "$PRE" >> "$LOG"
if [ "$PRE_RC" -ne 0 ]; then
    case "$PRE" in
        FAIL:*) fail "${PRE#FAIL: }" ;;
        *) [ "$PRE_RC" -eq 124 ] && fail "preflight ran past its limit" || fail "preflight exited with $PRE_RC (see $LOG)" ;;
    esac
fi
say "$PRE"

# Per-test limit only where pytest-timeout is installed (a hung test then fails alone).
TIMEOUT_OPT=()
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_OPT=(--timeout=150); fi
# The two test files run at the same time, each in its own pytest: most of their time is
# compiling kernels (one CPU core each), and neither measures time.
TESTS_LIMIT=$(limit 190 140)
TESTS_START=$SECONDS
run_tests() {  # run_tests NAME FILE
    timeout -k 10 "$TESTS_LIMIT" "$PYTHON" -u -m pytest -q -rfEs -p no:cacheprovider --durations=10 \
        ${TIMEOUT_OPT[@]+"${TIMEOUT_OPT[@]}"} "$2" --junitxml "$OUT/tests_$1.xml" > "$OUT/tests_$1.txt" 2>&1
}
say "kernel tests on the GPU (limit ${TESTS_LIMIT} s): tests/test_kernel_gpu.py and tests/test_kernel_pairs.py ${TIMEOUT_OPT[*]}"
run_tests gpu tests/test_kernel_gpu.py &
GPU_PID=$!
run_tests pairs tests/test_kernel_pairs.py &
PAIRS_PID=$!
wait "$GPU_PID"
GPU_RC=$?
STEPS+=("tests_gpu:$GPU_RC:$((SECONDS - TESTS_START)):$TESTS_LIMIT")
wait "$PAIRS_PID"
PAIRS_RC=$?
STEPS+=("tests_pairs:$PAIRS_RC:$((SECONDS - TESTS_START)):$TESTS_LIMIT")
for part in gpu pairs; do
    { echo "== tests/test_kernel_$part.py"; cat "$OUT/tests_$part.txt"; } >> "$OUT/tests.txt"
    rm -f "$OUT/tests_$part.txt"
done
say "tests: exit codes $GPU_RC (test_kernel_gpu.py), $PAIRS_RC (test_kernel_pairs.py); summaries:"
grep -E "^(=+ )?[0-9]+ (passed|failed|error)|no tests ran" "$OUT/tests.txt" | tee -a "$LOG"

# The profile: 8 rows (2 shapes x 2 backends x 2 passes), each in its own process with its own
# limit; rows are written as they finish, so a step stopped at its limit keeps what it measured.
PROFILE_LIMIT=$(limit 400 15)
CASE_LIMIT=$(( PROFILE_LIMIT / 3 ))
step profile "$PROFILE_LIMIT" "$PYTHON" -u tools/profile_pooler.py --device cuda --backends triton chunked \
    --zoo g14:256x32768 b16:256x4096 --passes both --timeout "$CASE_LIMIT" --no-peak-after --json "$OUT/profile.json"

HEADER="- $PRE
- commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ); script wall time ${SECONDS} s of a ${BUDGET} s budget"
STEP_ARGS=()
for s in "${STEPS[@]}"; do STEP_ARGS+=(--step "$s"); done
VERDICT=$(timeout -k 5 60 "$PYTHON" -u tools/gpu_check.py verdict "$OUT" --expected-rows 8 --header "$HEADER" \
    "${STEP_ARGS[@]}" 2>>"$LOG")
RC=$?
[ -n "$VERDICT" ] || VERDICT="FAIL: the verdict step exited with $RC without a verdict (see $LOG)"
[ "$RC" -eq 0 ] || RC=1
say "figures in $OUT/results.md"
say "$VERDICT"
exit $RC
