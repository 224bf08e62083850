#!/usr/bin/env bash
# DreamBooth fine-tuning of InstructPix2Pix (wraps main.py). Every setting is a variable with a default; set it in
# the environment. Extra arguments go to main.py (flags, or config overrides such as model.params.reg_weight=0):
#   DATA_ROOT=data/my_dog/training REG_DATA_ROOT=data/my_dog/regularization NAME=my_dog GPUS=0,1 ./train.sh
#   ./train.sh --max_steps 800 lightning.modelcheckpoint.params.every_n_train_steps=200
# Run `./train.sh --help` for every option. The fine-tuned weights end up in logs/<run>/export/model.safetensors.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

CKPT="${CKPT:-$HERE/models/instruct-pix2pix/instruct-pix2pix-00-22000.ckpt}"  # initial weights
CONFIG="${CONFIG:-$HERE/configs/dreambooth/train.yaml}"
DATA_ROOT="${DATA_ROOT:-data/my_subject/training}"          # training pairs (NN_0 input, NN_1 target)
REG_DATA_ROOT="${REG_DATA_ROOT:-data/my_subject/regularization}"  # regularization (class-prior) pairs
CLASS_WORD="${CLASS_WORD:-dog}"                              # the subject's class
SOURCE_WORD="${SOURCE_WORD:-wolf}"                           # the class the edits replace
IDENTIFIER="${IDENTIFIER:-sks}"                              # the rare token that will mean the subject
NAME="${NAME:-${SOURCE_WORD}_to_${IDENTIFIER}_${CLASS_WORD}}"
GPUS="${GPUS:-}"                                             # e.g. 0, or 0,1,2,3 (empty: CPU)
MAX_STEPS="${MAX_STEPS:-500}"
LOGDIR="${LOGDIR:-logs}"
PYTHON="${PYTHON:-$( [ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3 )}"

args=(--base "$CONFIG" -t --actual_resume "$CKPT" -n "$NAME" --data_root "$DATA_ROOT"
      --reg_data_root "$REG_DATA_ROOT" --class_word "$CLASS_WORD" --source_word "$SOURCE_WORD"
      --identifier "$IDENTIFIER" --max_steps "$MAX_STEPS" --logdir "$LOGDIR" --no-test)
[ -n "$GPUS" ] && args+=(--gpus "$GPUS")
exec "$PYTHON" "$HERE/main.py" "${args[@]}" "$@"
