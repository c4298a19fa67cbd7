#!/usr/bin/env bash
# GPU benchmark of the text-to-image model, for a lent GPU machine:
#   bash benchmarks/gpu_t2i.sh                                  -> $OUT/gpu_t2i.json (or benchmarks/_work/)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_t2i.sh --tiny   # tiny shapes on a CPU: checks the script
# SD 2.1-base-shaped UNet + VAE at 512 px and a Qwen2.5-0.5B-shaped LLM, bf16: training images/s of the recipe's loss
# step and 50-step sampling s/image, beside diffusers' own StableDiffusionPipeline on the same UNet
# (benchmarks/bench_t2i_gpu.py says what is measured). Nothing is installed or downloaded: the GPU machine's python3
# has torch, transformers, accelerate, pillow and pyarrow, but not diffusers, webdataset, braceexpand or omegaconf
# (which t2i imports); those travel as pure-Python wheels in benchmarks/wheels/ (fetch them first, where pip works:
# bash benchmarks/fetch_gpu_wheels.sh; carry that folder) and are unpacked into
# benchmarks/_work/gpu_site for a python that lacks them (T2I_FORCE_WHEELS=1: always, to test the wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then  # the Python that has torch (on the GPU machine: python3)
  for candidate in python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PYTHON=$candidate
      break
    fi
  done
fi
PY=${PYTHON:-python}
OUT_DIR=${OUT:-benchmarks/_work}
SITE=benchmarks/_work/gpu_site
mkdir -p "$OUT_DIR"
rm -rf "$SITE" && mkdir -p "$SITE"
shopt -s nullglob
for wheel in benchmarks/wheels/*.whl; do
  name=$(basename "$wheel")
  module=${name%%-*}  # diffusers, webdataset, braceexpand, omegaconf: the wheel's name is its module's
  if [ "${T2I_FORCE_WHEELS:-0}" = 1 ] || ! "$PY" -c "import $module" >/dev/null 2>&1; then
    "$PY" -m zipfile -e "$wheel" "$SITE"
    echo "carried: $name"
  fi
done
export PYTHONPATH="$SITE:.${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
# The script's own watchdog ends it after 330 s with a traceback; this is the backstop.
timeout -k 10 360 "$PY" benchmarks/bench_t2i_gpu.py --out "$OUT_DIR/gpu_t2i.json" "$@"
