#!/usr/bin/env bash
# Issue 15's evidence: how DTC should cluster. Off the shelf on a trained dense ViT (no retraining),
# the levers trained from scratch at the small scale (1 epoch on 10k images, 2 seeds), and the chosen
# clustering against dense / EViT / ToMe at the default job's length (2 epochs, all 60k images, 2 seeds).
# On 2 CPU cores: ~8 min for the dense ViT, ~5 min off the shelf, ~30 min small, ~2 h default.
# Finished runs are skipped and unfinished ones resumed when this is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
AV=${AV:-.venv/bin/adaptivision}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-experiments}
DENSE=${DENSE:-$OUT/dense-default}
if [[ ! -f "$DENSE/summary.json" ]]; then
  "$AV" train 'model_kwargs={condense_at: false, afa: false, cmtf: false}' compare_dense=false \
    output="$(dirname "$DENSE")" name="$(basename "$DENSE")"
fi
"$PY" benchmarks/off_the_shelf.py --run "$DENSE" --out benchmarks/results
"$AV" experiment run dtc-levers --seeds 1 --out "$OUT/small"
# breadth first: one seed of every cell, then the second seed
"$AV" experiment run dtc-confirm --seeds 1 --scale default --out "$OUT/default"
"$PY" benchmarks/mosaic_segmentation.py --backbones adaptivision-image --steps 900 --lr 3e-3 \
  --out benchmarks/results/mosaic-900-image
"$AV" experiment run dtc-confirm --seeds 2 --scale default --out "$OUT/default"
"$AV" experiment run dtc-levers --seeds 2 --out "$OUT/small"
"$AV" report "$OUT/small/dtc-levers" "$OUT/default/dtc-confirm" --out "$OUT/report-dtc"
"$AV" experiment run dtc-where --seeds 2 --scale default --out "$OUT/default"
# the records behind docs/results.md: one summary.json per run, no weights
for e in dtc-confirm dtc-where; do "$PY" benchmarks/commit_records.py "$OUT/default/$e" benchmarks/results/dtc/default; done
"$PY" benchmarks/commit_records.py "$OUT/small/dtc-levers" benchmarks/results/dtc/small
