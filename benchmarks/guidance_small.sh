#!/usr/bin/env bash
# The semantic-guidance table of docs/results.md: Fashion-MNIST, adaptivision_nano_patch4_28, 1 epoch,
# 10k training and 5k test images, 3 seeds (about an hour on 2 CPU cores), then the guided rows
# of Table 7 and of the variants experiment (2 seeds, as the rest of those tables), and the report.
# Needs the text extra (pip install -e '.[text]'; scripts/setup.sh installs it). Finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments}
AV=${AV:-.venv/bin/adaptivision}
"$AV" experiment run guidance --seeds 3 --out "$OUT"
for exp in table7 variants; do "$AV" experiment run "$exp" --seeds 2 --out "$OUT"; done
"$AV" report "$OUT"/guidance "$OUT"/table7 "$OUT"/variants --out "$OUT"/report-guidance
