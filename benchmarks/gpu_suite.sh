#!/usr/bin/env bash
# The GPU/TPU figures of benchmarks/RESULTS.md in one run (a few minutes on one H100, compiles
# included): the issue's anchors are base64:500m at batch 64 in bf16 (JAX-Toolbox: 107 images/s
# per A100) and the paper's SR 256 Efficient U-Net at batch 32; then `inspect --memory`'s
# estimate of the first row's step, to set beside its measured device_peak_gib; and each
# sampler's own cost per step beside the network's (benchmarks/sampler_overhead.py); then the
# sampling server under concurrent clients (benchmarks/serve_load.py); then DeepFloyd IF's
# network beside diffusers' (benchmarks/if_vs_diffusers.py, with the diffusers extra). Prints each
# table and its RESULT_JSON / MEMORY_JSON line; pass OUT=dir to also keep the output there.
#   bash benchmarks/gpu_suite.sh
#   TINY=1 bash benchmarks/gpu_suite.sh     # the same commands on tiny configs, on a CPU (a test)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-}"
PYTHON="${PYTHON:-python}"
status=0
run() {
  echo "=== $*"
  if [[ -n "$OUT" ]]; then mkdir -p "$OUT"; "$PYTHON" -m "$@" 2>&1 | tee -a "$OUT/gpu_suite.log"
  else "$PYTHON" -m "$@"; fi
  local rc=${PIPESTATUS[0]}
  if [[ $rc -ne 0 ]]; then echo "=== FAILED ($rc): $*"; status=1; fi
}
if [[ "${TINY:-0}" == 1 ]]; then
  BASE=configs/base64.py:tiny; SR=configs/sr256.py:tiny; BATCH=2; SR_BATCH=2
  TIMING=(--steps=1 --repeats=1); SAMPLE_TIMING=(--steps=2 --repeats=1)
  OVERHEAD=(--steps=4 --network_steps=1 --batch_size=2 --samplers=ddim,dpmpp_2m,unipc)
else
  BASE=configs/base64.py:500m; SR=configs/sr256.py:paper; BATCH=64; SR_BATCH=32
  TIMING=(); SAMPLE_TIMING=(); OVERHEAD=(--network_steps=2 --batch_size=8)
fi
run benchmarks.train_step --config=$BASE --batch_size=$BATCH --config.dtype=bfloat16 "${TIMING[@]}"
run benchmarks.train_step --config=$SR --batch_size=$SR_BATCH --config.dtype=bfloat16 "${TIMING[@]}"
run benchmarks.sample --config=$BASE --batch_size=$BATCH --config.dtype=bfloat16 "${SAMPLE_TIMING[@]}"
# Issue 18: the fast samplers' own cost per step against the network's (should be ~0).
run benchmarks.sampler_overhead --configs=$BASE,$SR "${OVERHEAD[@]}"
run imagen_jax.cli inspect --config=$BASE --config.dtype=bfloat16 --memory --mesh=fsdp:1 \
    --batch_size=$BATCH --device=h100
# Serving: `imagen-jax serve` under 1, 4 and 16 concurrent clients (benchmarks/serve_load.py), on
# the demo's cascade (tiny: base64:tiny at 16x16 and sr256:tiny) trained a few steps here first.
SERVE_DIR="${OUT:-${TMPDIR:-/tmp}}/serve_cascade"
if [[ "${TINY:-0}" == 1 ]]; then
  SERVE_BASE=(--config=configs/base64.py:tiny --config.image_size=16)
  SERVE_SR=(--config=configs/sr256.py:tiny)
  SERVE_LOAD=(--clients=1,4 --requests=8 --batch_sizes=2 --steps=2 --overload_seconds=5)
else
  SERVE_BASE=(--config=configs/demo_base.py:quick); SERVE_SR=(--config=configs/demo_sr.py:quick)
  SERVE_LOAD=(--batch_sizes=1,4,16)
fi
SERVE_TRAIN=(--config.total_steps=2 --config.checkpoint_every=2 --config.sample_every=0
             --config.batch_size=8 --config.data.data_dir="$SERVE_DIR/data")
run imagen_jax.cli train "${SERVE_BASE[@]}" --workdir="$SERVE_DIR/base" "${SERVE_TRAIN[@]}"
run imagen_jax.cli train "${SERVE_SR[@]}" --workdir="$SERVE_DIR/sr" "${SERVE_TRAIN[@]}"
run benchmarks.serve_load --stages="$SERVE_DIR/base,$SERVE_DIR/sr" "${SERVE_LOAD[@]}"
# DeepFloyd IF: an IF-style 64x64 stage beside diffusers (torch on the same GPU), guided sampling
# and a training step; where the diffusers extra is installed.
if "$PYTHON" -c "import diffusers, torch" 2>/dev/null; then
  if [[ "${TINY:-0}" == 1 ]]; then IF_ARGS=(--size=tiny --rounds=1)
  else IF_ARGS=(--torch_device=cuda --train_dtypes=float32,bfloat16); fi
  run benchmarks.if_vs_diffusers "${IF_ARGS[@]}"
fi
exit $status
