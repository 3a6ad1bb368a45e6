#!/usr/bin/env bash
# The checks for a lent GPU machine, as one script: OUT=<folder> bench/gpu_check.sh
#
# 1. builds and installs the package (CUDA kernels included) against the torch already there, offline;
# 2. records nvidia-smi and the torch / CUDA / triton versions;
# 3. runs the test files that hold the CUDA cases (continuing to the benchmarks if they fail);
# 4. runs the CUDA benchmarks of the loss and of the meta-step ops into $OUT/bench.json and $OUT/table.txt.
# The whole-step benchmark has its own script, bench/gpu_step_check.sh, to run after this one.
# Every stage has its own timeout; together they stay under 8 minutes. Logs and stage exit codes
# ($OUT/summary.txt) land in $OUT. Exits non-zero if the build, the tests or a benchmark run failed.
#
# pytest is run through its console script from the repository root, never `python -m pytest`, which
# would put the source tree on sys.path: the tests and benchmarks must import the installed package.
set -euo pipefail
: "${OUT:?set OUT to the output folder}"
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."

# The compiled kernels, not the interpreter or a forced fallback.
unset TRITON_INTERPRET METAMASK_FAST_NO_EXT METAMASK_FAST_BACKEND

TESTS=(tests/test_triton_loss.py tests/test_ops.py tests/test_multi_tensor_ops.py tests/test_optimizer_ops.py
       tests/test_batch_augment.py)
start=$SECONDS
summary="$OUT/summary.txt"
: >"$summary"
record() { echo "$1 rc=$2 at ${SECONDS}s" | tee -a "$summary"; }

# 1. Build and install (seconds: build 170, env 20, tests 140, losses 140, report 5 = 475).
rc=0
timeout -k 10 170 python -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check \
    -v . >"$OUT/build.log" 2>&1 || rc=$?
record build "$rc"
if [[ $rc -ne 0 ]]; then
    tail -n 60 "$OUT/build.log"
    exit "$rc"
fi

# 2. The machine, the versions and the build: `python -m metamask_fast.info` from the repository root, which
#    also checks that a source checkout runs the installed build (origin: checkout, compiled_ops loaded).
{
    nvidia-smi || true
    command -v python pytest nvcc || true
    nvcc --version || true
    timeout 60 python -m metamask_fast.info
} >"$OUT/env.txt" 2>&1 || true
cat "$OUT/env.txt"

# 3. The tests with CUDA cases; -rs lists what was skipped and why.
tests_rc=0
# The sm_90 compile check runs on every CPU machine already (80 s of ptxas); here real launches compile.
timeout -k 10 140 pytest "${TESTS[@]}" -q -rs -p no:cacheprovider -k "not compile_for_the_h200" \
    >"$OUT/tests.log" 2>&1 || tests_rc=$?
record tests "$tests_rc"
tail -n 40 "$OUT/tests.log"

# 4. The CUDA benchmarks (their ids carry the device, so -k cuda selects them).
bench_rc=0
timeout -k 10 140 pytest bench/test_bench_losses.py bench/test_bench_ops.py bench/test_bench_data.py --benchmark-only \
    -k "cuda or augmentation" -p no:cacheprovider \
    --benchmark-json="$OUT/bench.json" >"$OUT/bench.log" 2>&1 || bench_rc=$?
record bench_losses "$bench_rc"
if [[ -s "$OUT/bench.json" ]]; then
    timeout 5 python bench/report.py "$OUT/bench.json" >"$OUT/table.txt" 2>&1 || true
    cat "$OUT/table.txt"
else
    tail -n 40 "$OUT/bench.log"
fi

echo "total $((SECONDS - start))s" | tee -a "$summary"
if [[ $tests_rc -ne 0 || $bench_rc -ne 0 ]]; then
    exit 1
fi
