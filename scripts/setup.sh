#!/usr/bin/env bash
# Installs everything AdaptiVision needs on a fresh machine: Debian's Fashion-MNIST package (the
# default data set) where apt is available, a virtual environment in .venv, PyTorch and the
# package itself (editable) with its test tools. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -d /usr/share/datasets/fashion-mnist ]] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "[setup] installing Debian's dataset-fashion-mnist"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "[setup] could not install dataset-fashion-mnist; pass a torchvision root with --data-dir instead"
fi

# pip warns about every missing folder of this machine kind's local package index: drop that noise
pipq() { .venv/bin/pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing PyTorch (about a minute)"
  # These exact versions lie on this kind of machine's disk; elsewhere pip downloads them.
  pipq install -q --upgrade pip
  pipq install -q "torch==2.14.1" "torchvision==0.29.1"
fi
if ! .venv/bin/python -c "import adaptivision, pytest" >/dev/null 2>&1 \
   || [[ pyproject.toml -nt .venv/.adaptivision-installed ]]; then
  echo "[setup] installing adaptivision and its dependencies"
  pipq install -q -e ".[test]"
  touch .venv/.adaptivision-installed
fi
