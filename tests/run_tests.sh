#!/usr/bin/env bash
# Set up the project's virtual environment (with the test extras) and run the tests.
# Usage: bash tests/run_tests.sh [pytest args...]     e.g. bash tests/run_tests.sh --slow -k unet
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
export HF_HUB_OFFLINE=1
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
