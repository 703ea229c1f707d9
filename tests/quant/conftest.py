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
