#!/usr/bin/env bash
# Per-image K on a GPU with fewer, padded batches (docs/performance.md, "GPU"): the 224² small model
# at its default budget with one batch per K, max_groups=4/2/1, per-image K in PADK slots without a
# host sync (pad_k), and one K for every image, against timm's DeiT-S, fp32 and fp16 autocast, in
# one call.   OUT=<dir> bash benchmarks/gpu_groups.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}; PY=${PY:-python3}; DEV=${DEV:-cuda}; BS=${BS:-256}; ROUNDS=${ROUNDS:-7}
M=${M:-adaptivision_small_patch16_224}; DENSE=${DENSE:-deit_small_patch16_224}
K=${K:-128}; PADK=${PADK:-160}
MODELS="$DENSE,$M,$M:max_groups=4,$M:max_groups=2,$M:max_groups=1,$M:pad_k=$PADK,$M:k=$K"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
timeout 200 $PY -m adaptivision benchmark --device "$DEV" --models "$MODELS" --batch-size "$BS" --rounds "$ROUNDS" --out "$OUT/gpu-groups-fp32"
[ "$DEV" = cuda ] && timeout 200 $PY -m adaptivision benchmark --device cuda --amp --models "$MODELS" --batch-size "$BS" --rounds "$ROUNDS" --out "$OUT/gpu-groups-fp16"
cat "$OUT"/gpu-groups-*.md
