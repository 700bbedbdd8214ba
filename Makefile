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

.PHONY: setup test demo lint bench experiments clean gpu-check
SLICES ?= $(DEMO_DIR)/slices
EXP_DIR ?= experiments
# U-Net baseline steps per chain: the three chain U-Nets together train in 154 s on the 2-core Zen 5
# EPYC (seventeenth session), less than the demo's unified stage there (about 230 s since the
# twentieth session), and still beat UniBrain, by 0.3-2.8 dB PSNR (7-11 dB before the fifteenth; README)
UNET_STEPS ?= 500

setup: $(STAMP)

# --no-cache-dir: no second copy of every downloaded wheel in ~/.cache (a CI machine once ran out of
# disk during this install; the venv alone is about 2.3 GB)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-cache-dir "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-cache-dir -e ".[dev]"
	@touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not gpu"

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) PY=$(PY) bash examples/demo.sh

lint: $(STAMP)
	$(PY) -m ruff check unibrain_cli tests

bench: $(STAMP)
	$(PY) -m unibrain_cli.bench --out bench.json

# A CUDA machine only, never CI: gpu-marked tests, flash/flex vs SDPA, bf16 step throughput and MFU,
# one FSDP step, generation memory -> gpu-check.json (exits 2 without CUDA; not part of `make test`).
gpu-check: $(STAMP)
	$(PY) -m unibrain_cli.gpu_check --out gpu-check.json

# The longer comparisons on the demo's slices (run `make demo` first): the Table 3 ablation
# variants at the same budget, then evaluation with U-Net and two-stage baselines and a 5-seed ensemble.
experiments: $(STAMP)
	@test -d $(SLICES) || { echo "no $(SLICES): run make demo first (or pass SLICES=...)"; exit 2; }
	@# the demo's run is the full variant (same recipe, data and seed): reuse it instead of retraining
	@if [ ! -e $(EXP_DIR)/ablation/full ] && grep -qs '^name = "small"' $(DEMO_DIR)/run/recipe.resolved.toml; then \
	  mkdir -p $(EXP_DIR)/ablation && cp -r $(DEMO_DIR)/run $(EXP_DIR)/ablation/full && echo "full variant: a copy of $(DEMO_DIR)/run"; fi
	$(PY) -m unibrain_cli train --recipe recipes/ablation-A.toml --data $(SLICES) --out $(EXP_DIR)/ablation/A --resume
	$(PY) -m unibrain_cli train --recipe recipes/ablation-B.toml --data $(SLICES) --out $(EXP_DIR)/ablation/B --resume
	$(PY) -m unibrain_cli train --recipe recipes/ablation-C.toml --data $(SLICES) --out $(EXP_DIR)/ablation/C --resume
	$(PY) -m unibrain_cli train --recipe recipes/small.toml --data $(SLICES) --out $(EXP_DIR)/ablation/full --resume
	$(PY) -m unibrain_cli evaluate --ckpt $(EXP_DIR)/ablation --ablation --data $(SLICES) --split test \
	  --scenario all --chain --ensemble 5 --baselines copy,unet,two-stage --unet-steps $(UNET_STEPS) --out $(EXP_DIR)/eval --force

clean:
	rm -rf $(DEMO_DIR) $(EXP_DIR) bench.json .pytest_cache
