#!/usr/bin/env bash
# RepOpt-VGG-B1 vs RepVGG-B1 at 224x224 on one GPU (H100/H200), in under 8 minutes:
#   1. experiments/speed_memory.py: train images/s (RepOpt-SGD / RepVGG / plain SGD), compiled train-step
#      memory, the largest batch within an 11 GiB budget (the paper's 2080 Ti), deployed vs un-fused
#      inference; bfloat16 compute, batch 32.
#   2. experiments/equivalence_drift.py: the csla B1 with SGD vs the target B1 with RepOpt-SGD (and the AdamW
#      pairs) for 20 steps at 224x224 in float32, with true float32 convolutions (JAX's default on GPU
#      would use TF32, whose rounding is 1e-3, not 1e-7).
# Prints both tables and leaves them in experiments/results/{speed_memory_gpu_b1,equivalence_drift_gpu_b1}.*
#
# Usage: experiments/gpu_bench.sh            (the GPU run)
#        experiments/gpu_bench.sh --tiny     (the same two steps at smoke-test size, e.g. on CPU)
#        experiments/gpu_bench.sh --dry-run  (print the commands only)
# Environment: PYTHON (default: python), OUT (default: experiments/results).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-experiments/results}
MODE=${1:-gpu}

case "$MODE" in
  gpu|--dry-run)
    TAG=_gpu_b1
    SPEED=(experiments/speed_memory.py --gpu --archs B1:224:32:10 --rounds 2 --max_probes 3
           --memory_budget_gib 11 --tag "$TAG" --out "$OUT")
    EQUIV=(experiments/equivalence_drift.py --arch B1 --image_size 224 --steps 20 --batch_size 16
           --probe_size 16 --scale_sets signed --float64 none --tag "$TAG" --out "$OUT")
    ;;
  --tiny)
    TAG=_gpu_bench_tiny
    SPEED=(experiments/speed_memory.py --tiny --tag "$TAG" --out "$OUT")
    EQUIV=(experiments/equivalence_drift.py --tiny --tag "$TAG" --out "$OUT")
    ;;
  *)
    echo "usage: $0 [--tiny | --dry-run]" >&2
    exit 2
    ;;
esac

if [[ "$MODE" == "--dry-run" ]]; then
  echo "$PYTHON ${SPEED[*]}"
  echo "JAX_DEFAULT_MATMUL_PRECISION=highest $PYTHON ${EQUIV[*]}"
  exit 0
fi

start=$(date +%s)
echo "== 1/2 speed and memory =="
"$PYTHON" "${SPEED[@]}" > /dev/null
echo "== 2/2 equivalence in float32 =="
JAX_DEFAULT_MATMUL_PRECISION=highest "$PYTHON" "${EQUIV[@]}" > /dev/null
echo "== done in $(( $(date +%s) - start )) s =="
for report in "$OUT/speed_memory$TAG.md" "$OUT/equivalence_drift$TAG.md"; do
  echo
  echo "#### $report"
  sed -n '/^## /,$p' "$report"
done
