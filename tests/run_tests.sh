#!/usr/bin/env bash
# Set up the project's virtual environment (with the test extras) and run the tests.
# Usage: bash tests/run_tests.sh [pytest args...]     e.g. bash tests/run_tests.sh --slow -k unet (-n 0: no workers)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
export HF_HUB_OFFLINE=1
# One pytest worker per core, up to 4 (each runs single-threaded, conftest.py); a test file stays on one worker so its
# module fixtures are built once. I2D_TEST_WORKERS=0 runs everything in this process (or pass -n 0).
cores="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
workers="${I2D_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
exec "${VENV:-.venv}/bin/python" -m pytest -n "$workers" --dist loadfile "$@"
