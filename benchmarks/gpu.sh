#!/usr/bin/env bash
# One prepared run on a lent GPU (H100/H200): install, the CUDA tests (kernels, device noise, CUDA graphs, attention
# dispatch), the fused step 1M-64M (eager and graphed), attention and the whole attention block against every SDPA
# backend, the sampler loops eager vs CUDA graph vs torch.compile -> results/gpu/kernels.json.
#   bash benchmarks/gpu.sh        (from the repository root)
# Every stage has a time limit inside an overall budget of about 4 minutes, and a failing stage does not stop
# the next; the JSON is rewritten after every section and each output is copied to $OUT (when set) as soon as it
# exists, so a cut-short run still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET FASTDIFF_KERNELS
RES=results/gpu
BUDGET_S=250       # whole script
REPORT_S=20        # kept back for the final report stage
mkdir -p "$RES"
export FASTDIFF_BENCH_LOG=$RES/bench_figures.jsonl  # every GPU figure, written as it is measured
: >"$FASTDIFF_BENCH_LOG"
LOGS=("$RES/gpu.log")
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && LOGS+=("$OUT/gpu.log")
: | tee "${LOGS[@]}" >/dev/null

log() { echo "[gpu.sh +${SECONDS}s] $*" | tee -a "${LOGS[@]}"; }
copy_out() { [ -n "${OUT:-}" ] && for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/"; done; return 0; }

# stage NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, what the budget leaves), log it, never abort the script
stage() {
  local name=$1 limit=$2 reserve=$REPORT_S
  shift 2
  [[ "$name" == report* ]] && reserve=0
  local left=$((BUDGET_S - SECONDS - reserve))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then log "skip $name: time budget spent"; return 0; fi
  log "start $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "${LOGS[@]}"
  log "end $name: exit ${PIPESTATUS[0]}"
}

log "host ${HOSTNAME:-?}; $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())" 2>&1 | tee -a "${LOGS[@]}"

# install the repo without touching its dependencies (no internet there); PEP 668 systems need the second try.
# Without any install, everything here still runs from the repository root: fastdiff/__init__.py maps kernels/ as
# fastdiff.kernels in a checkout.
stage install 90 python3 -m pip install --no-deps --no-build-isolation -e .
if ! python3 -m pip show fastdiff >/dev/null 2>&1; then
  stage install-pep668 90 python3 -m pip install --no-deps --no-build-isolation --break-system-packages -e .
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

export FASTDIFF_DISPATCH_CACHE=$RES/attention-dispatch.json  # the dispatch table this run measures, kept with it

# report NAME: rewrite kernels.json from everything measured so far (cheap; the final one adds correctness checks)
report() {
  stage "report-$1" 15 python3 benchmarks/gpu_report.py --bench "$FASTDIFF_BENCH_LOG" --junit "$RES/tests_cuda.xml" \
    --out "$RES/kernels.json" --no-correctness
  copy_out "$RES/kernels.json" "$FASTDIFF_BENCH_LOG"
}

stage tests 45 python3 -m pytest tests/test_kernels.py tests/test_noise.py tests/test_graphs.py tests/test_dispatch.py \
  -q -p no:cacheprovider --junitxml="$RES/tests_cuda.xml"
copy_out "$RES/tests_cuda.xml"
report tests
stage bench-sampler-step 30 python3 -m pytest benchmarks/test_bench_kernels.py -q -p no:cacheprovider \
  -k sampler_step_gpu --benchmark-only --benchmark-json="$RES/bench_sampler_step.json"
report sampler-step
stage bench-attention 35 python3 -m pytest benchmarks/test_bench_kernels.py benchmarks/test_bench_graphs.py -q \
  -p no:cacheprovider -k "test_attention_gpu or attention_block" --benchmark-only \
  --benchmark-json="$RES/bench_attention.json"
copy_out "$FASTDIFF_DISPATCH_CACHE"
report attention
stage bench-loops 70 python3 -m pytest benchmarks/test_bench_graphs.py -q -p no:cacheprovider -k sampler_loop \
  --benchmark-only --benchmark-json="$RES/bench_loops.json"
report loops
stage report "$REPORT_S" python3 benchmarks/gpu_report.py --bench "$FASTDIFF_BENCH_LOG" \
  --junit "$RES/tests_cuda.xml" --out "$RES/kernels.json"
copy_out "$RES/kernels.json" "$FASTDIFF_BENCH_LOG"
log "done; outputs in $RES${OUT:+ and $OUT}"
