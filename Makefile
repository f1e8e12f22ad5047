# Two entry points: `make demo` and `make test`. Both create/reuse .venv, offline apart from
# the package registries. torch is installed first, pinned to the CPU build on this machine's
# disk: a bare `torch` requirement would pull a multi-GB CUDA build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
PINS    := diffusers==0.42.1 transformers==5.23.0 accelerate==1.15.0 peft==0.21.2 \
           safetensors==0.8.0 pillow==12.3.0 gradio==6.31.0 pytest==9.2.0
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast pretrain bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(PINS)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m stylelora.demo --out out/demo

test: $(VENV)/.installed
	bash .ci/browser-deps
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow and not browser"

# Rebuild the embedded base and judge from scratch (seeded). Writes stylelora/world/assets.
pretrain: $(VENV)/.installed
	$(BIN)/stylelora world pretrain --out stylelora/world/assets

# Quality and speed tables for the README (bench/results/*.md); ~75 min on 2 cores, run alone.
bench: $(VENV)/.installed
	$(BIN)/python bench/base.py
	$(BIN)/python bench/styles.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/blend.py

clean:
	rm -rf out runs .pytest_cache
