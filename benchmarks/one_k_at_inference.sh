#!/usr/bin/env bash
# Per-image K against one K for every image, at inference, on the same checkpoints (docs/results.md,
# "Per-image K at inference"): bash benchmarks/one_k_at_inference.sh RUN_DIR [OUT_DIR]
# RUN_DIR holds seed0/ and seed1/ of a DTC run of `adaptivision experiment run` (last.safetensors each).
set -euo pipefail
RUN=${1:?a run directory with seed0/ and seed1/}
OUT=${2:-benchmarks/results/dtc/default/one-k-at-inference}
AV=${AV:-.venv/bin/adaptivision}
mkdir -p "$OUT"
for s in 0 1; do
  for b in image k=24 k=32; do
    args=(); [ "$b" = image ] || args=(--budget "$b")
    "$AV" eval --checkpoint "$RUN/seed$s/last.safetensors" "${args[@]}" > "$OUT/seed$s-${b/=/}.json"
  done
done
