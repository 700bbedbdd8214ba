# UniBrain — every target sets itself up on a fresh clone (virtual env in .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CPU machine gets the CPU build of torch 2.13.0 (no multi-GB CUDA download); on a GPU
# machine pass TORCH_SPEC="torch==2.13.0" with your CUDA index, or install torch first.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_out
export OMP_NUM_THREADS ?= 2

.PHONY: setup test demo lint bench experiments clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not gpu"

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) PY=$(PY) bash examples/demo.sh

lint: $(STAMP)
	$(PY) -m ruff check unibrain_cli tests

bench: $(STAMP)
	$(PY) -m unibrain_cli.bench --out bench.json

clean:
	rm -rf $(DEMO_DIR) bench.json .pytest_cache
