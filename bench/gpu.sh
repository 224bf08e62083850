#!/usr/bin/env bash
# The GPU check in one go, for the first time a GPU is available (results: bench/RESULTS.md, "GPU").
#
#   bash bench/gpu.sh                       # every stage: tests, bench, shapesworld
#   bash bench/gpu.sh tests bench           # some stages
#
# Stages (each bounded by its own timeout; the whole script stays under 8 minutes on one H200):
#   tests        the GPU test tier: pytest -m gpu (tests/test_gpu.py and the gpu-marked unit tests)
#   bench        bench/bench_gpu.py: edit at 512 px / 50 steps and a 50-step fine-tune at 256 px (full-size
#                InstructPix2Pix with random weights), ours vs diffusers, eager and torch.compile, peak CUDA memory
#   shapesworld  trains the ShapesWorld base model (configs/shapesworld/base.yaml) on the GPU, SW_MINUTES at most
#
# Output goes to $OUT (default bench/gpu-out). On a machine without a package registry, put wheels of the missing
# pure-Python dependencies in .whl/ (omegaconf, diffusers, open-clip-torch, ftfy, wcwidth, importlib_metadata):
# they are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SW_MINUTES="${SW_MINUTES:-5}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu.sh: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
stages="${*:-tests bench shapesworld}"
log="$OUT/summary.log"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, transformers, pytorch_lightning as pl, diffusers; print('torch', torch.__version__, \
'| transformers', transformers.__version__, '| lightning', pl.__version__, '| diffusers', diffusers.__version__)"
} >>"$log" 2>&1

shapesworld_candidate() {  # name, steps, extra main.py overrides...
  local name=$1 steps=$2; shift 2
  timeout $((SW_MINUTES * 60 + 90)) "$PY" scripts/shapesworld.py base --out "$OUT/base_$name.safetensors" \
    --max_steps "$steps" --gpus "0," --logdir "/tmp/sw_$name" "lightning.trainer.max_time=00:00:$(printf %02d "$SW_MINUTES"):00" "$@" >"/tmp/sw_$name.log" 2>&1
  echo "shapesworld $name: exit $?" >>"$log"
  tail -c 1500 "/tmp/sw_$name.log" | tr '\r' '\n' | tail -5 >>"$log"
  cp /tmp/sw_"$name"/*_shapesworld_base/metrics.csv "$OUT/metrics_$name.csv" 2>/dev/null
  # Files come back from the device in pieces of at most 16 MB: `cat base_b.safetensors.part* >base_b.safetensors`.
  if [ -f "$OUT/base_$name.safetensors" ] && [ "$(stat -c %s "$OUT/base_$name.safetensors")" -gt 15000000 ]; then
    split -b 15000000 -d "$OUT/base_$name.safetensors" "$OUT/base_$name.safetensors.part" && rm "$OUT/base_$name.safetensors"
  fi
}

for stage in $stages; do
  start=$(date +%s)
  case $stage in
    tests)
      timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests >"$OUT/gpu-tests.log" 2>&1
      echo "tests: exit $? ($(tail -1 "$OUT/gpu-tests.log"))" >>"$log" ;;
    bench)
      timeout 400 "$PY" bench/bench_gpu.py --out "$OUT/bench_gpu.md" ${BENCH_ARGS:-} >>"$log" 2>&1
      echo "bench: exit $?" >>"$log" ;;
    shapesworld)
      # The bundled base model's recipe (configs/shapesworld/base.yaml, --max_steps 4000), with SW_MINUTES as a
      # guard: the exported file's metadata records the steps actually trained.
      shapesworld_candidate base "${SW_STEPS:-4000}" data.params.num_workers=14 ;;
    *) echo "gpu.sh: unknown stage $stage" >&2; exit 2 ;;
  esac
  echo "stage $stage: $(($(date +%s) - start)) s" >>"$log"
done
cat "$log"
