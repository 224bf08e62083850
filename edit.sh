#!/usr/bin/env bash
# Edit images with InstructPix2Pix or a model fine-tuned by train.sh (wraps scripts/edit_cli.py).
# Every setting is a variable with a default; set it in the environment. Extra arguments go to edit_cli.py:
#   INPUT=photos/ OUTPUT=edited/ EDIT="replace the wolf with a sks dog" ./edit.sh --seed 42
#   CKPT=logs/<run>/export/model.safetensors INPUT="wolves/*.jpg" ./edit.sh --cfg-text 5 7.5 --cfg-image 1.2 1.5
# Run `./edit.sh --help` for every option.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

CKPT="${CKPT:-$HERE/models/instruct-pix2pix/instruct-pix2pix-00-22000.ckpt}"  # .ckpt or .safetensors
CONFIG="${CONFIG:-$HERE/configs/instruct-pix2pix/generate.yaml}"
INPUT="${INPUT:-}"                                   # an image, a folder, or a quoted glob
OUTPUT="${OUTPUT:-outputs/edits}"                    # a folder (or one file name for one input)
EDIT="${EDIT:-replace the wolf with a sks dog}"      # the instruction
STEPS="${STEPS:-100}"
RESOLUTION="${RESOLUTION:-512}"
CFG_TEXT="${CFG_TEXT:-7.5}"                          # text guidance; several values (quoted) make a sweep
CFG_IMAGE="${CFG_IMAGE:-1.5}"                        # image guidance; several values (quoted) make a sweep
SAMPLER="${SAMPLER:-euler_ancestral}"
DEVICE="${DEVICE:-auto}"
PYTHON="${PYTHON:-$( [ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3 )}"

if [ -z "$INPUT" ] && [[ " $* " != *" --input "* ]] && [[ " $* " != *" --help "* && " $* " != *" -h "* ]]; then
  echo "edit.sh: set INPUT to an image, a folder or a glob (e.g. INPUT=photo.jpg ./edit.sh)" >&2
  exit 2
fi
args=(--ckpt "$CKPT" --config "$CONFIG" --output "$OUTPUT" --edit "$EDIT" --steps "$STEPS"
      --resolution "$RESOLUTION" --sampler "$SAMPLER" --device "$DEVICE")
[ -n "$INPUT" ] && args+=(--input "$INPUT")
read -r -a cfg_text <<< "$CFG_TEXT"
read -r -a cfg_image <<< "$CFG_IMAGE"
exec "$PYTHON" "$HERE/scripts/edit_cli.py" "${args[@]}" --cfg-text "${cfg_text[@]}" --cfg-image "${cfg_image[@]}" "$@"
