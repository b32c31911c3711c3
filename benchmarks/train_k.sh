#!/bin/bash
# One K per training batch against per-image K (docs/performance.md, "One K per training batch").
# Run on an otherwise idle machine; writes benchmarks/results/speed-{nano-train-batch-k,nano-inference-candidates,224-train-batch-k}.{json,md}
set -e
cd "$(dirname "$0")/.."
AV=.venv/bin/adaptivision
M=adaptivision_nano_patch4_28; C="$M:condense_at=2:k_mid=24:tau=20"
$AV benchmark --train --img-size 28 --batch-size 64 --rounds 15 --out benchmarks/results/speed-nano-train-batch-k \
  --models "$M:reduction=none,$M:train_k=image,$M:train_k=batch,$C:train_k=image,$C:train_k=batch,$C:afa=False:train_k=image,$C:afa=False:train_k=batch"
$AV benchmark --img-size 28 --batch-size 64 --rounds 15 --out benchmarks/results/speed-nano-inference-candidates \
  --models "$M:reduction=none,$M,$C,$C:afa=False"
S=adaptivision_small_patch16_224
$AV benchmark --train --img-size 224 --batch-size 32 --rounds 5 --warmup 2 --out benchmarks/results/speed-224-train-batch-k \
  --models "deit_small_patch16_224,$S:train_k=image,$S:train_k=batch,$S:train_k=batch:afa=False"
