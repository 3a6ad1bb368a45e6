#!/usr/bin/env bash
# The whole-step benchmark on a lent GPU: OUT=<folder> bench/gpu_step_check.sh
#
# Run it after bench/gpu_check.sh, on the same machine while it is still warm: that script builds and
# installs the package, this one only times bench/test_bench_step.py's CUDA cases (the authors' ResNet-18
# at N=512: the authors-style step, faithful, exact, meta_interval=5, Barlow Twins, and faithful/exact in
# bfloat16 with channels_last) into $OUT/step.json and $OUT/step_table.txt, with images/s, peak memory
# and model-FLOP utilisation. Under 5 minutes. Exits 2 when the package is not installed, non-zero when
# the benchmark fails.
set -euo pipefail
: "${OUT:?set OUT to the output folder}"
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET METAMASK_FAST_NO_EXT METAMASK_FAST_BACKEND

if ! (cd "$OUT" && python -c 'import metamask_fast._C' 2>/dev/null); then
    echo "gpu_step_check: metamask_fast with its extension is not installed here; run bench/gpu_check.sh first" >&2
    exit 2
fi

rc=0
timeout -k 10 280 pytest bench/test_bench_step.py --benchmark-only -k cuda -p no:cacheprovider \
    --benchmark-json="$OUT/step.json" >"$OUT/step.log" 2>&1 || rc=$?
echo "step_bench rc=$rc" | tee "$OUT/step_summary.txt"
if [[ -s "$OUT/step.json" ]]; then
    timeout 5 python bench/report.py "$OUT/step.json" | tee "$OUT/step_table.txt"
else
    tail -n 40 "$OUT/step.log"
fi
exit "$rc"
