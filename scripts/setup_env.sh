#!/usr/bin/env bash
# Create (or update) the project's virtual environment: CPU torch, the pinned dependencies, this package.
# Usage: bash scripts/setup_env.sh [--test]    (always the `eval` extra: matplotlib for the charts; --test adds the
#                                              test-only packages: diffusers, scikit-image, pytest, playwright, the
#                                              `memory` extra: peft, bitsandbytes for LoRA and 8-bit AdamW, the
#                                              `app` extra: gradio, and the OS's Chromium for the browser test)
# Set VENV to use another folder (default .venv at the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
extras="[eval]"                                 # matplotlib: the main job's charts (no torchvision)
[ "${1:-}" = "--test" ] && extras="[test,eval,memory,app]"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0                      # the CPU wheel here; a plain `torch` would pull a multi-GB CUDA build
"${PIP[@]}" -e ".$extras"
"${PIP[@]}" --no-deps open-clip-torch==3.3.0   # only for its CLIP BPE vocabulary file (offline tokenizer)

# The browser test (tests/test_edit_app.py) drives Debian's Chromium; playwright's own browser download is not used.
if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
  SUDO=()
  [ "$(id -u)" -eq 0 ] || SUDO=(sudo -n)
  if command -v apt-get >/dev/null && "${SUDO[@]}" true 2>/dev/null; then
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup_env.sh: /usr/bin/chromium is missing and cannot be installed here (needs apt-get as root or" \
      "sudo); the browser test fails until it is: sudo apt-get install chromium" >&2
  fi
fi
