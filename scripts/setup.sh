#!/usr/bin/env bash
# Create .venv and install the project for development (about 1-2 minutes with a warm pip cache).
# torch is installed FIRST and pinned: otherwise accelerate/transformers pull a multi-GB CUDA build
# (see ../shared/reference/stack-notes.md). Override with TORCH_SPEC="torch==X" on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

install() {  # pip install, printing one line per package (the whole log is in .venv/pip.log); fails when pip does
  set +e
  .venv/bin/pip install "$@" 2>&1 | tee .venv/pip.log | grep --line-buffered -E "^(Collecting|Successfully installed)"
  local status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    tail -20 .venv/pip.log
    echo "pip install $* failed (the whole log: .venv/pip.log)" >&2
    exit "$status"
  fi
}

echo "[1/3] creating .venv with $($PYTHON --version 2>&1)"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
echo "[2/3] installing $TORCH_SPEC first (the CPU build here)"
install "$TORCH_SPEC"
echo "[3/3] installing the project and its dependencies (transformers, diffusers, accelerate, datasets, ray, eval metrics, ...)"
install -e ".[dev,ray,eval,serve]"
.venv/bin/python -c "import torch, transformers; print(f'ready: torch {torch.__version__}, transformers {transformers.__version__}')"
touch .venv/.installed
