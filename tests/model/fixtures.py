"""Session fixtures shared by tests/model, tests/engine and tests/cli (imported by their
conftest.py files): the oracle module and one SmolLM2 load."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python, the oracle (skips where it is not installed)."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is the test oracle; install .[dev]")


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    """SmolLM2-135M-Instruct Q4_1, loaded once, 512 positions of context."""
    import gguflm

    return gguflm.load(smollm2_path, n_ctx=512)
