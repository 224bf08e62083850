#!/usr/bin/env bash
# Make training or regularization pairs with the stock InstructPix2Pix run in reverse (wraps scripts/generate_dataset.py).
# Every setting is a variable with a default; set it in the environment. Extra arguments go to generate_dataset.py:
#   MODE=train SUBJECT_DIR=photos/my_dog CLASS_WORD=dog SOURCE_WORD=wolf OUTPUT=data/my_dog/training ./generate_dataset.sh
#   MODE=reg REG_SOURCE_DIR=photos/wolves REG_CLASS_DIR=photos/dogs NUM_PAIRS=150 \
#     OUTPUT=data/my_dog/regularization ./generate_dataset.sh --batch-size 8
#   (add REG_SOURCE_PAIRS=data/my_dog/training for the paired prior: every training input edited into CLASS_WORD)
#   MODE=train SOURCE_DIR=photos/wolves CKPT=logs/<run>/export/model.safetensors OUTPUT=data/my_dog/labelled \
#     ./generate_dataset.sh   (labelled pairs: real wolves edited into "sks dog" by a model fine-tuned on the subject)
# Rerun the same command to resume after an interruption. Run `./generate_dataset.sh --help` for every option.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

MODE="${MODE:-train}"                                # train: subject pairs; reg: class-prior pairs
CLASS_WORD="${CLASS_WORD:-dog}"                      # the subject's class
SOURCE_WORD="${SOURCE_WORD:-wolf}"                   # the other class the edits start from
IDENTIFIER="${IDENTIFIER:-sks}"                      # rare token naming the subject (training captions only)
SUBJECT_DIR="${SUBJECT_DIR:-}"                       # train: real photos of the subject
SOURCE_DIR="${SOURCE_DIR:-}"                         # train: real SOURCE_WORD photos to label (CKPT fine-tuned)
SAMPLES_PER_IMAGE="${SAMPLES_PER_IMAGE:-1}"          # train: pairs (seeds) per photo
REG_SOURCE_DIR="${REG_SOURCE_DIR:-}"                 # reg: real photos of SOURCE_WORD (edited into CLASS_WORD)
REG_CLASS_DIR="${REG_CLASS_DIR:-}"                   # reg: real photos of CLASS_WORD (edited into SOURCE_WORD)
NUM_PAIRS="${NUM_PAIRS:-100}"                        # reg: pairs of the photo folders (100-200 recommended)
REG_SOURCE_PAIRS="${REG_SOURCE_PAIRS:-}"             # reg: a MODE=train output: its inputs edited into CLASS_WORD too
if [ "$MODE" = train ]; then DEFAULT_OUTPUT="data/${IDENTIFIER}_${CLASS_WORD}/training"
else DEFAULT_OUTPUT="data/${IDENTIFIER}_${CLASS_WORD}/regularization"; fi
OUTPUT="${OUTPUT:-$DEFAULT_OUTPUT}"                  # a new folder, or the folder of a run to resume
CKPT="${CKPT:-$HERE/models/instruct-pix2pix/instruct-pix2pix-00-22000.ckpt}"  # the stock InstructPix2Pix weights
CONFIG="${CONFIG:-$HERE/configs/instruct-pix2pix/generate.yaml}"
STEPS="${STEPS:-100}"
RESOLUTION="${RESOLUTION:-512}"
CFG_TEXT="${CFG_TEXT:-7.5}"
CFG_IMAGE="${CFG_IMAGE:-1.5}"
SAMPLER="${SAMPLER:-euler_ancestral}"
SEED="${SEED:-0}"                                    # base seed; every pair's own seed goes to pairs.jsonl
BATCH_SIZE="${BATCH_SIZE:-4}"                        # pairs per model call
DEVICE="${DEVICE:-auto}"
PYTHON="${PYTHON:-$( [ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3 )}"

wants_help() { [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; }
if [ "$MODE" = train ] && [ -z "$SUBJECT_DIR$SOURCE_DIR" ] && [[ " $* " != *" --subject_dir "* ]] \
    && [[ " $* " != *" --source_dir "* ]] && ! wants_help "$@"; then
  echo "generate_dataset.sh: set SUBJECT_DIR to the folder of subject photos (e.g. SUBJECT_DIR=photos/my_dog)" \
       "and/or SOURCE_DIR (photos of $SOURCE_WORD to label with a fine-tuned CKPT)" >&2
  exit 2
fi
if [ "$MODE" = reg ] && [ -z "$REG_SOURCE_DIR$REG_CLASS_DIR$REG_SOURCE_PAIRS" ] && [[ " $* " != *" --reg_"* ]] \
    && ! wants_help "$@"; then
  echo "generate_dataset.sh: set REG_SOURCE_DIR (photos of $SOURCE_WORD), REG_CLASS_DIR (photos of $CLASS_WORD)" \
       "and/or REG_SOURCE_PAIRS (training pairs)" >&2
  exit 2
fi
args=(--mode "$MODE" --class_word "$CLASS_WORD" --source_word "$SOURCE_WORD" --identifier "$IDENTIFIER"
      --output "$OUTPUT" --ckpt "$CKPT" --config "$CONFIG" --steps "$STEPS" --resolution "$RESOLUTION"
      --cfg-text "$CFG_TEXT" --cfg-image "$CFG_IMAGE" --sampler "$SAMPLER" --seed "$SEED"
      --batch-size "$BATCH_SIZE" --device "$DEVICE")
if [ "$MODE" = train ]; then
  [ -n "$SUBJECT_DIR" ] && args+=(--subject_dir "$SUBJECT_DIR")
  [ -n "$SOURCE_DIR" ] && args+=(--source_dir "$SOURCE_DIR")
  args+=(--samples_per_image "$SAMPLES_PER_IMAGE")
else
  [ -n "$REG_SOURCE_DIR" ] && args+=(--reg_source_dir "$REG_SOURCE_DIR")
  [ -n "$REG_CLASS_DIR" ] && args+=(--reg_class_dir "$REG_CLASS_DIR")
  [ -n "$REG_SOURCE_PAIRS" ] && args+=(--reg_source_pairs "$REG_SOURCE_PAIRS")
  if [ -n "$REG_SOURCE_DIR$REG_CLASS_DIR" ]; then args+=(--num_pairs "$NUM_PAIRS"); fi
fi
exec "$PYTHON" "$HERE/scripts/generate_dataset.py" "${args[@]}" "$@"
