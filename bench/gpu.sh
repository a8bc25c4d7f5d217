#!/usr/bin/env bash
# GPU benchmarks on one H100 in under 5 minutes, installing nothing: Qwen2.5-VL-3B/7B shapes with random weights
# (built on the meta device, materialised on the GPU), measured by bench/gpu_bench.py one measurement per process,
# each under its own time guard; every result is appended to OUT_DIR/results.jsonl (and summary.txt) as soon as
# it exists, so a measurement that runs out of time costs only itself.
#
#   bash bench/gpu.sh OUT_DIR              # GPU: env, copy bandwidth, realistic rollout (7B), GRPO update memory
#                                          # (3B), load path (3B), decode (3B, 7B), engine (7B), 3B train step,
#                                          # compiled decode (in that order: what a real run needs first)
#   bash bench/gpu.sh --dry-run OUT_DIR    # CPU at the tiny model's shapes (tests/test_bench.py runs this)
# Environment: PYTHON (default python3), GPU_BENCH_BUDGET_S (default 285: the whole run's wall-clock budget).
set -uo pipefail
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry_run"; shift; fi
OUT="${1:?usage: bash bench/gpu.sh [--dry-run] OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BUDGET="${GPU_BENCH_BUDGET_S:-285}"
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
command -v timeout >/dev/null || { echo "gpu.sh: the 'timeout' command is missing" >&2; exit 3; }

left() { echo $((BUDGET - ($(date +%s) - START))); }
run() { # NAME GUARD_S [gpu_bench args...]
  local name=$1 guard=$2 l rc
  shift 2
  l=$(left)
  if [ "$l" -lt 20 ]; then
    echo "$name: skipped, ${l}s left of the ${BUDGET}s budget" | tee -a "$OUT/summary.txt"
    return 0
  fi
  [ "$guard" -gt "$l" ] && guard=$l
  echo "== $name (time guard ${guard}s, $(left)s left)"
  timeout --signal=TERM --kill-after=10 "$guard" "$PY" bench/gpu_bench.py --out "$OUT" --only "$name" $DRY "$@"
  rc=$?
  if [ $rc -ne 0 ]; then
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then why="time guard of ${guard}s"; else why="exit $rc"; fi
    echo "$name: stopped ($why); results so far are kept" | tee -a "$OUT/summary.txt"
  fi
  return 0
}

echo "== env"
"$PY" bench/gpu_bench.py --out "$OUT" --only env $DRY || {
  echo "gpu.sh: the environment is incomplete (see MISSING above); nothing was measured" >&2
  exit 3
}
run bw 30
run rollout 90 # engine.py at 7B: 16 prompts of 4k / 3k tokens (left-padded), 1k new tokens; peak vs memory.py
run update 90  # the GRPO update at 3B on one GPU: peak memory of forward/backward and step vs memory.py
run load 100   # a 3B checkpoint written, then read (fp32 on the host) and moved to the GPU, timed
run decode 110
run engine 90 # engine.py at 7B shapes: long-tailed lengths, 32 prompts x 8 through 64 slots
run train 100
run compile 120 --sizes 3b # static cache + torch.compile, with whatever time is left
echo "== done in $(($(date +%s) - START))s; results in $OUT/results.jsonl"
cat "$OUT/summary.txt"
