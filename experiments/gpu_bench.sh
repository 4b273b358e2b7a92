#!/usr/bin/env bash
# RepOpt-VGG-B1 vs RepVGG-B1 vs plain at 224x224 on one GPU (H100/H200), meant to finish in under 8 minutes:
#   1. experiments/speed_memory.py, twice (bfloat16, then float32 = TF32 convolutions, JAX's GPU default):
#      train images/s of RepOpt-SGD / RepVGG+SGD / plain SGD at batch 32, 64 and 128, the compiled train-step
#      memory of each and its slope per example (batch vs twice the batch, compiled only), and the largest batch
#      within 80 GiB (searched once per dtype from the measured batches' memory; the probes compile without
#      conv autotuning, which memory does not need).
#   2. experiments/gpu_report.py: one table of both with model FLOPs utilization (MFU, datasheet peaks).
#   3. experiments/equivalence_drift.py: the csla B1 with SGD vs the target B1 with RepOpt-SGD (and the AdamW
#      pairs) for 20 steps at 224x224 in true float32 (JAX_DEFAULT_MATMUL_PRECISION=highest: TF32 rounds at
#      1e-3; --cpu_threads 0: the host is not pinned to one core, GPU compilation uses many). Only when steps
#      1-2 took less than EQUIV_IF_UNDER_S seconds (default 240), so that the whole run
#      stays within the 8 minutes; otherwise it says it skipped it.
# Prints the tables and leaves the reports in experiments/results/: speed_memory_gpu_b1_{bf16,f32}.*,
# gpu_bench_b1.{md,json}, equivalence_drift_gpu_b1.*
#
# Usage: experiments/gpu_bench.sh            (the GPU run)
#        experiments/gpu_bench.sh --tiny     (every step at smoke-test size, e.g. on CPU)
#        experiments/gpu_bench.sh --dry-run  (print the commands only)
# Environment: PYTHON (default: python), OUT (default: experiments/results), EQUIV_IF_UNDER_S (default 240;
# --tiny always runs step 3).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-experiments/results}
MODE=${1:-gpu}
EQUIV_IF_UNDER_S=${EQUIV_IF_UNDER_S:-240}
[[ "$MODE" == "--tiny" ]] && EQUIV_IF_UNDER_S=${EQUIV_IF_UNDER_S_TINY:-1000000}  # the smoke test runs every step

case "$MODE" in
  gpu|--dry-run)
    TAG=_gpu_b1
    SUMMARY=gpu_bench_b1
    COMMON=(--archs B1:224:32:10 B1:224:64:10 B1:224:128:10 --rounds 2 --max_probes 2 --memory_budget_gib 80
            --probe_options '{"xla_gpu_autotune_level": 0}' --no_inference)
    PEAK=()
    EQUIV=(experiments/equivalence_drift.py --arch B1 --image_size 224 --steps 20 --batch_size 16
           --probe_size 16 --scale_sets signed --float64 none --cpu_threads 0 --tag "$TAG" --out "$OUT")
    ;;
  --tiny)
    TAG=_gpu_bench_tiny
    SUMMARY=gpu_bench_tiny
    COMMON=(--tiny)
    PEAK=(--peak_tflops 1)  # CPUs are not in the datasheet table: exercise the MFU arithmetic anyway
    EQUIV=(experiments/equivalence_drift.py --tiny --tag "$TAG" --out "$OUT")
    ;;
  *)
    echo "usage: $0 [--tiny | --dry-run]" >&2
    exit 2
    ;;
esac
SPEED_BF16=(experiments/speed_memory.py "${COMMON[@]}" --compute_dtype bfloat16 --tag "${TAG}_bf16" --out "$OUT")
SPEED_F32=(experiments/speed_memory.py "${COMMON[@]}" --compute_dtype float32 --tag "${TAG}_f32" --out "$OUT")
REPORT=(experiments/gpu_report.py --inputs "$OUT/speed_memory${TAG}_bf16.json" "$OUT/speed_memory${TAG}_f32.json"
        "${PEAK[@]}" --out "$OUT/$SUMMARY")

if [[ "$MODE" == "--dry-run" ]]; then
  q() { local out=() a; for a in "$@"; do out+=("$(printf '%q' "$a")"); done; echo "${out[*]}"; }
  q "$PYTHON" "${SPEED_BF16[@]}"
  q "$PYTHON" "${SPEED_F32[@]}"
  q "$PYTHON" "${REPORT[@]}"
  echo "JAX_DEFAULT_MATMUL_PRECISION=highest $(q "$PYTHON" "${EQUIV[@]}")"
  exit 0
fi

start=$(date +%s)
echo "== 1/3 speed and memory, bfloat16 =="
"$PYTHON" "${SPEED_BF16[@]}" > /dev/null
echo "   ($(( $(date +%s) - start )) s)"
echo "== 1/3 speed and memory, float32 =="
"$PYTHON" "${SPEED_F32[@]}" > /dev/null
echo "   ($(( $(date +%s) - start )) s)"
echo "== 2/3 summary with MFU =="
"$PYTHON" "${REPORT[@]}"
elapsed=$(( $(date +%s) - start ))
if (( elapsed < EQUIV_IF_UNDER_S )); then
  echo "== 3/3 equivalence in float32 ($elapsed s so far) =="
  JAX_DEFAULT_MATMUL_PRECISION=highest "$PYTHON" "${EQUIV[@]}" > /dev/null
  echo
  echo "#### $OUT/equivalence_drift$TAG.md"
  sed -n '/^## /,$p' "$OUT/equivalence_drift$TAG.md"
else
  echo "== 3/3 equivalence skipped: steps 1-2 took $elapsed s (>= EQUIV_IF_UNDER_S=$EQUIV_IF_UNDER_S) =="
fi
echo "== done in $(( $(date +%s) - start )) s =="
