"""The model tests' helpers: oracles.py (llama.cpp calls, KL), synth.py (synthetic GGUF
files) and fixtures.py (session fixtures, shared with tests/engine and tests/cli)."""

from __future__ import annotations

import sys
from pathlib import Path

# The suite runs with --import-mode=importlib: put the helper modules on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import llama_cpp, smollm2_model  # noqa: E402,F401  (session fixtures)
