#!/usr/bin/env bash
# The GPU/TPU figures of benchmarks/RESULTS.md in one run (a few minutes on one H100, compiles
# included): the issue's anchors are base64:500m at batch 64 in bf16 (JAX-Toolbox: 107 images/s
# per A100) and the paper's SR 256 Efficient U-Net at batch 32. Prints each table and its
# RESULT_JSON line; pass OUT=dir to also keep the output there.
#   bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-}"
run() {
  echo "=== $*"
  if [[ -n "$OUT" ]]; then mkdir -p "$OUT"; python -m "$@" 2>&1 | tee -a "$OUT/gpu_suite.log"
  else python -m "$@"; fi
}
run benchmarks.train_step --config=configs/base64.py:500m --batch_size=64 --config.dtype=bfloat16
run benchmarks.train_step --config=configs/sr256.py:paper --batch_size=32 --config.dtype=bfloat16
run benchmarks.sample --config=configs/base64.py:500m --batch_size=64 --config.dtype=bfloat16
