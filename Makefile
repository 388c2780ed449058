# Set-up and entry points.  `make demo` and `make test` work on a fresh machine:
# they create .venv, install torch==2.13.0 (the CPU build) first, then implreg.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= runs/demo-tf-dynamics

.PHONY: setup demo test test-all bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,nuclear,ray,slurm]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/implreg run tf-dynamics --out $(DEMO)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python bench/bench_cp_step.py
	$(BIN)/python bench/bench_tf_dynamics.py
	$(BIN)/python bench/bench_cp_large.py
	$(BIN)/python bench/bench_tensor_rank_fit.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
