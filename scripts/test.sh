#!/usr/bin/env bash
# The test suite (README Quickstart, and what CI runs): installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
