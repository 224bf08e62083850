#!/usr/bin/env bash
# Create (or update) the project's virtual environment: CPU torch, the pinned dependencies, this package.
# Usage: bash scripts/setup_env.sh [--test]    (always the `eval` extra: matplotlib for the charts; --test adds the
#                                              test-only packages: diffusers, scikit-image, pytest, and the
#                                              `memory` extra: peft, bitsandbytes for LoRA and 8-bit AdamW)
# Set VENV to use another folder (default .venv at the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
extras="[eval]"                                 # matplotlib: the main job's charts (no torchvision)
[ "${1:-}" = "--test" ] && extras="[test,eval,memory]"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0                      # the CPU wheel here; a plain `torch` would pull a multi-GB CUDA build
"${PIP[@]}" -e ".$extras"
"${PIP[@]}" --no-deps open-clip-torch==3.3.0   # only for its CLIP BPE vocabulary file (offline tokenizer)
