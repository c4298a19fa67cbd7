#!/usr/bin/env bash
# Create .venv and install the project for development.
# torch is installed FIRST and pinned: otherwise accelerate/transformers pull a multi-GB CUDA build
# (see ../shared/reference/stack-notes.md). Override with TORCH_SPEC="torch==X" on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet "$TORCH_SPEC"
.venv/bin/pip install --quiet -e ".[dev,ray]"
touch .venv/.installed
