#!/usr/bin/env bash
# Set up the project's virtual environment (CPU torch, pinned dependencies, test extras) and run the tests.
# Usage: bash tests/run_tests.sh [pytest args...]     e.g. bash tests/run_tests.sh --slow -k unet
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0                      # the CPU wheel; a plain `torch` would pull a multi-GB CUDA build
"${PIP[@]}" -e ".[test]"
"${PIP[@]}" --no-deps open-clip-torch==3.3.0   # only for its CLIP BPE vocabulary file (offline tokenizer)
export HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m pytest "$@"
