# The two quickstart commands (README): `make quickstart` and `make test`.
.PHONY: setup quickstart quickstart-data test test-slow lint bench
VENV := .venv
BIN := $(VENV)/bin

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

# The main job on the embedded default: the miniature world, end to end (README: `mpm demo`). Rerunning continues
# where an interrupted run stopped.
quickstart: setup
	$(BIN)/mpm demo --output runs/demo

# What `make quickstart` ran before the demo: a synthetic pair set sharded, UniMM-Chat dialogues built.
quickstart-data: setup
	$(BIN)/mpm data synth --output runs/quickstart/pairs --num-samples 300
	$(BIN)/mpm data shard --config configs/data/quickstart.yaml
	$(BIN)/mpm unimm synth --output runs/quickstart/annotations --num-images 200
	$(BIN)/mpm unimm build --config configs/unimm/quickstart.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/bench_shard.py
	$(BIN)/python benchmarks/bench_unimm.py
	$(BIN)/python benchmarks/bench_i2t.py
	$(BIN)/python benchmarks/bench_resume.py
	$(BIN)/python benchmarks/bench_stage1.py
	$(BIN)/python benchmarks/bench_t2i.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_demo.py
	$(BIN)/python benchmarks/bench_align.py
	if $(BIN)/python -c "import trl" 2>/dev/null; then $(BIN)/python benchmarks/bench_align_trl.py; else echo "bench_align_trl.py skipped: needs the bench-trl extra (pip install -e '.[bench-trl]')"; fi
