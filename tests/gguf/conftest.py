"""Fixtures for the GGUF reader tests: small valid files written by the official `gguf` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_sample(path: Path, *, with_tensors: bool = True, alignment: int | None = None) -> Path:
    """A small valid file with every value type, arrays (nested too) and a few tensors."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁ wörld 🙂")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", -0.1)
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_f32", [0.5, 2.0])
    w.add_array("t.arr_str", ["a", "", "ü"])
    w.add_array("t.arr_bool", [True, False])
    w.add_array("t.arr_nested", [[1, 2], [3]])
    w.add_array("t.arr_empty", [])
    if with_tensors:
        rng = np.random.default_rng(0)
        w.add_tensor("a.weight", rng.standard_normal((3, 64), dtype=np.float32))
        w.add_tensor("b.weight", rng.standard_normal((5, 32)).astype(np.float16))
        w.add_tensor("c.q8", rng.integers(0, 256, size=(2, 34 * 2), dtype=np.uint8),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path



@pytest.fixture(scope="session", name="write_sample")
def write_sample_fixture():
    return write_sample
