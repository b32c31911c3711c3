#!/usr/bin/env bash
# The CUDA checks in one short script (docs/performance.md, "GPU"): the CUDA test, the 224² speed
# targets in fp32 and fp16 autocast, training updates, and torch.compile. OUT=<dir> bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}; T=$(mktemp -d)
PY=${PY:-python3}
AV="$PY -m adaptivision"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_deploy.py -k cuda 2>&1 | tail -15
timeout 120 $PY benchmarks/speed_targets.py --device cuda --batch-size 256 --rounds 7 --out "$T/gpu-fp32"
timeout 120 $PY benchmarks/speed_targets.py --device cuda --amp --batch-size 256 --rounds 7 --out "$T/gpu-amp"
timeout 90 $AV benchmark --train --device cuda --amp --models deit_small_patch16_224,adaptivision_small_patch16_224 \
  --batch-size 64 --rounds 5 --out "$T/gpu-train-amp"
timeout 150 $AV benchmark --device cuda --amp --compile --channels-last \
  --models deit_small_patch16_224,adaptivision_small_patch16_224:k=128 --batch-size 256 --rounds 5 --out "$T/gpu-compile"
cat "$T"/*.md > "$OUT/gpu.md" 2>/dev/null
cp "$T"/gpu-fp32.json "$T"/gpu-amp.json "$OUT/" 2>/dev/null
cat "$OUT/gpu.md"
