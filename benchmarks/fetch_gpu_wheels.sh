#!/usr/bin/env bash
# The pure-Python wheels benchmarks/gpu_t2i.sh carries to a GPU machine whose Python lacks them (no network there):
#   bash benchmarks/fetch_gpu_wheels.sh     -> benchmarks/wheels/ (about 6.7 MB; not committed)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: -d benchmarks/wheels \
  diffusers==0.42.1 omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7
ls -l benchmarks/wheels
