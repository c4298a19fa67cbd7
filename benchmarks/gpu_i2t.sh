#!/usr/bin/env bash
# GPU benchmark of issue 4, for a lent GPU machine (its own Python has torch and transformers; nothing is installed):
#   bash benchmarks/gpu_i2t.sh            -> prints tokens/s and MFU, writes $OUT/gpu_i2t.json (or benchmarks/_work/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/_work}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
PYTHONPATH=. python benchmarks/bench_i2t_gpu.py --out "$OUT_DIR/gpu_i2t.json" "$@"
