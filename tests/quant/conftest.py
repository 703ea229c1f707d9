"""Fixtures for the dequantization tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def dequantize_paths():
    """name -> dequantize function, one for each way gguflm.dequantize runs on the CPU:
    the torch code ("torch", every type, any device) and the compiled CPU kernels
    ("kernels", the types they cover, when they build here). Both must match libggml."""
    from gguflm.quant import cpu, dequantize, use_cpu_kernels

    def with_kernels(enable: bool):
        def run(*args, **kwargs):
            previous = use_cpu_kernels(enable)
            try:
                return dequantize(*args, **kwargs)
            finally:
                use_cpu_kernels(previous)
        return run

    paths = {"torch": with_kernels(False)}
    if cpu.available():
        paths["kernels"] = with_kernels(True)
    return paths


@pytest.fixture(scope="session")
def oracle():
    """libggml's to_float through llama-cpp-python's bundled library."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python's libggml is the oracle; install .[dev]")
    from gguflm.verify import ggml_oracle

    if not ggml_oracle.available():
        pytest.skip("libggml-base not loadable from llama_cpp")
    return ggml_oracle
