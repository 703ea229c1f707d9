"""Fixtures for the CPU-kernel tests: the built kernels, random GGUF blocks, both code paths."""

from __future__ import annotations

import numpy as np
import pytest

from gguflm.gguf.types import LAYOUTS, GGMLType


@pytest.fixture(scope="session")
def cpu_kernels():
    """gguflm.quant.cpu with its C++ kernels built (a failed build fails the tests: the
    CPU path is a feature, not an option)."""
    from gguflm.quant import cpu

    cpu.kernel_types()  # builds, loads and checks the block sizes against LAYOUTS
    return cpu


@pytest.fixture(params=["simd", "portable"])
def code_path(request, cpu_kernels):
    """Run a test on the AVX-512 path and on the portable C++ path."""
    if request.param == "simd" and not cpu_kernels.simd_available():
        pytest.skip("this CPU has no AVX-512")
    old = cpu_kernels.use_simd(request.param == "simd")
    yield request.param
    cpu_kernels.use_simd(old)


def _random_halves(rng: np.random.Generator, n: int) -> np.ndarray:
    """F16 scales as real files have them (normal, both signs, a spread of exponents), with
    some zeros and subnormals mixed in."""
    v = rng.standard_normal(n) * np.exp2(rng.integers(-12, 2, n))
    v[rng.random(n) < 0.03] = 0.0
    sub = rng.random(n) < 0.03
    v[sub] = rng.integers(1, 1024, sub.sum()) * 2.0**-24
    return v.astype(np.float16)


@pytest.fixture(scope="session")
def random_weight():
    """random_weight(ggml_type, n_rows, row_len, seed) -> uint8 [n_blocks * type_size]:
    random code bytes, F16 fields replaced by finite random halves (NaN/inf scales would make
    any comparison meaningless)."""

    def make(ggml_type: GGMLType, n_rows: int, row_len: int, seed: int = 0) -> np.ndarray:
        lay = LAYOUTS[ggml_type]
        n = n_rows * row_len // lay.block_size
        rng = np.random.default_rng(seed)
        raw = rng.integers(0, 256, size=(n, lay.type_size), dtype=np.uint8)
        off = lay.offsets
        for f in lay.fields:
            if f.dtype == "<f2":
                halves = _random_halves(rng, n * f.count).reshape(n, f.count)
                raw[:, off[f.name]:off[f.name] + 2 * f.count] = halves.view(np.uint8).reshape(n, -1)
        return raw.reshape(-1)

    return make
