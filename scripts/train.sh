#!/usr/bin/env bash
# The main job (README Quickstart): installs what it needs, then trains AdaptiVision and the dense
# model of the same shape on Fashion-MNIST and prints the comparison. Arguments go to
# `adaptivision train` (e.g. `bash scripts/train.sh epochs=5`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/adaptivision train "$@"
