"""The libggml oracle itself: its view of every type agrees with our layout table, it
refuses inconsistent buffers instead of reading past them, and it is import-safe."""

from __future__ import annotations

import numpy as np
import pytest

from gguflm.gguf.types import LAYOUTS, GGMLType
from gguflm.verify import ggml_oracle


@pytest.fixture(scope="module")
def lib():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python's libggml is the oracle; install .[dev]")
    if not ggml_oracle.available():
        pytest.skip("libggml-base not loadable from llama_cpp")
    return ggml_oracle


@pytest.mark.parametrize("t", list(GGMLType), ids=lambda t: t.name)
def test_layout_table_matches_libggml_traits(lib, t):
    name, blck, tsize = lib.type_traits(t)
    assert name.upper() == t.name
    assert (blck, tsize) == (LAYOUTS[t].block_size, LAYOUTS[t].type_size)


def test_refuses_inconsistent_buffers(lib):
    with pytest.raises(ValueError, match="need 18 bytes"):
        lib.ggml_to_float(np.zeros(17, np.uint8), GGMLType.Q4_0, 32)
    with pytest.raises(ValueError, match="whole number"):
        lib.ggml_to_float(np.zeros(18, np.uint8), GGMLType.Q4_0, 31)
    with pytest.raises(ValueError, match="no to_float"):
        lib.ggml_to_float(np.zeros(36, np.uint8), GGMLType.Q8_1, 32)


def test_unavailable_without_llama_cpp(monkeypatch):
    monkeypatch.setattr(ggml_oracle.importlib.util, "find_spec", lambda name: None)
    ggml_oracle._lib.cache_clear()
    ggml_oracle._to_float_fn.cache_clear()
    try:
        assert not ggml_oracle.available()
        with pytest.raises(ggml_oracle.OracleUnavailable, match="llama-cpp-python is not installed"):
            ggml_oracle.ggml_to_float(np.zeros(18, np.uint8), GGMLType.Q4_0, 32)
    finally:
        ggml_oracle._lib.cache_clear()
        ggml_oracle._to_float_fn.cache_clear()
