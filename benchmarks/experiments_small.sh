#!/usr/bin/env bash
# The small-scale results of docs/results.md: Fashion-MNIST, adaptivision_nano_patch4_28, 1 epoch,
# 10k training and 5k test images, 2 seeds; about an hour on 2 CPU cores in all.
# Runs shared between experiments are trained once; re-running skips finished runs and experiments (FORCE=1 redoes the records).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments}
AV=${AV:-.venv/bin/adaptivision}
run() {  # run NAME [args...]: once, unless FORCE=1
  if [[ -f "$OUT/$1/experiment.json" && -z "${FORCE:-}" ]]; then echo "$1: recorded before"; return; fi
  "$AV" experiment run "$@" --out "$OUT"
}
for exp in table5 figure1a table7; do run "$exp" --seeds 2; done
for exp in table4 variants; do run "$exp" --seeds 2; done
run theorem1
"$AV" report "$OUT"/table5 "$OUT"/figure1a "$OUT"/table7 "$OUT"/table4 "$OUT"/variants "$OUT"/theorem1 \
  --out "$OUT"/report
