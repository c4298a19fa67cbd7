#!/usr/bin/env bash
# GPU benchmarks for a lent GPU machine (its own Python has torch and transformers; nothing is installed):
#   bash benchmarks/gpu_i2t.sh
#   1. SFT tokens/s and MFU, MPM beside native LLaVA (issue 4)            -> $OUT/gpu_i2t.json
#   2. stage-1 steps with the efficiency switches off vs on (issue 8)     -> $OUT/gpu_stage1.json
#   3. torchvision vs PIL image processor on an exported LLaVA (issue 8)  -> printed
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/_work}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
PYTHONPATH=. python benchmarks/bench_i2t_gpu.py --out "$OUT_DIR/gpu_i2t.json" "$@"
PYTHONPATH=. python benchmarks/bench_stage1_gpu.py --out "$OUT_DIR/gpu_stage1.json"
PYTHONPATH=. python benchmarks/export_pixels.py | tee "$OUT_DIR/export_pixels.txt"
