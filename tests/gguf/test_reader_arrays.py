"""Numeric metadata arrays stay views over the file's mapping (issue 16 item 8): parsing a
large array costs no memory, and the values equal the official `gguf` reader's."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest

import gguflm
from gguflm.gguf.reader import MetadataArray, ValueType

gguf = pytest.importorskip("gguf")

N_BIG = 20 << 20  # a 20 MiB UINT8 array


def _string(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


@pytest.fixture(scope="module")
def big_array_file(tmp_path_factory):
    """GGUF v3 with one 20 MiB UINT8 array, one FLOAT32 array and a string (written by hand:
    GGUFWriter packs arrays item by item, which takes minutes for 20M items)."""
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, N_BIG, dtype=np.uint8)
    floats = rng.standard_normal(1000).astype("<f4")
    kvs = [
        _string("general.architecture") + struct.pack("<I", ValueType.STRING) + _string("llama"),
        _string("t.big") + struct.pack("<IIQ", ValueType.ARRAY, ValueType.UINT8, N_BIG) + big.tobytes(),
        _string("t.floats") + struct.pack("<IIQ", ValueType.ARRAY, ValueType.FLOAT32, len(floats))
        + floats.tobytes(),
    ]
    path = tmp_path_factory.mktemp("arrays") / "big.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    return path, big, floats


def test_big_array_parses_in_little_memory(big_array_file):
    path, big, _ = big_array_file
    tracemalloc.start()
    try:
        f = gguflm.GGUFFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"parsing a {N_BIG >> 20} MiB array traced {peak / 2**20:.1f} MiB"
    arr = f.metadata["t.big"]
    assert isinstance(arr, MetadataArray) and len(arr) == N_BIG
    view = np.asarray(arr)
    assert view.dtype == np.uint8 and not view.flags.writeable
    assert not view.flags.owndata  # a view over the mapping, not a copy
    assert np.array_equal(view, big)


def test_numeric_arrays_match_official_reader(tmp_path):
    """Every numeric element type, against gguf-py's reader (it builds one part per element:
    slow on the 20 MiB array, so the oracle sees smaller ones)."""
    rng = np.random.default_rng(2)
    arrays = {
        "u8": rng.integers(0, 256, 4096, dtype=np.uint8), "i8": rng.integers(-128, 128, 100, dtype=np.int8),
        "u16": rng.integers(0, 1 << 16, 100, dtype=np.uint16), "i16": rng.integers(-1 << 15, 1 << 15, 100, dtype=np.int16),
        "u32": rng.integers(0, 1 << 32, 100, dtype=np.uint32), "i32": rng.integers(-1 << 31, 1 << 31, 100, dtype=np.int32),
        "u64": rng.integers(0, 1 << 63, 100, dtype=np.uint64) * 2 + 1, "i64": rng.integers(-1 << 62, 1 << 62, 100),
        "f32": rng.standard_normal(100).astype(np.float32), "f64": rng.standard_normal(100),
    }
    w = gguf.GGUFWriter(str(tmp_path / "n.gguf"), "llama")
    for name, a in arrays.items():
        vt = gguf.GGUFValueType[{"u8": "UINT8", "i8": "INT8", "u16": "UINT16", "i16": "INT16", "u32": "UINT32",
                                 "i32": "INT32", "u64": "UINT64", "i64": "INT64", "f32": "FLOAT32",
                                 "f64": "FLOAT64"}[name]]
        w.add_key_value(f"t.{name}", a.tolist(), gguf.GGUFValueType.ARRAY, vt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    f = gguflm.GGUFFile(tmp_path / "n.gguf")
    ref = gguf.GGUFReader(str(tmp_path / "n.gguf"))
    for name in arrays:
        key = f"t.{name}"
        want = ref.fields[key].contents()
        got = f.metadata[key]
        assert isinstance(got, MetadataArray)
        assert got == want and got.tolist() == want and list(got) == want, key
        assert [type(x) for x in got[:3]] == [type(x) for x in want[:3]], key
        assert int(ref.fields[key].types[1]) == f.metadata_types[key][1], key


def test_array_behaves_as_a_sequence_of_python_values(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    w.add_array("t.i32", [5, -2, 7])
    w.add_array("t.bool", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    f = gguflm.GGUFFile(tmp_path / "s.gguf")
    ref = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    a, b = f.metadata["t.i32"], f.metadata["t.bool"]
    assert a == ref.fields["t.i32"].contents() == [5, -2, 7]
    assert b == ref.fields["t.bool"].contents() == [True, False, True]
    assert [type(x) for x in a] == [int] * 3 and [type(x) for x in b] == [bool] * 3
    assert a[1:] == [-2, 7] and list(reversed(a)) == [7, -2, 5] and -2 in a and a.index(7) == 2
    assert b[1] is False and np.asarray(b).dtype == bool
    assert f.metadata["t.nested"] == [[1, 2], [3]]
    assert f.metadata_types["t.i32"] == (ValueType.ARRAY, ValueType.INT32)


def test_per_layer_arrays_reach_the_model_config(tmp_path):
    """Consumers of numeric arrays take MetadataArray: gemma3's per-layer sliding-window
    pattern (BOOL array) and a uniform per-layer head_count_kv (INT32 array)."""
    from gguflm.model.arch import arch_spec
    from gguflm.model.config import KEY_TABLE, _check, _swa_layers

    w = gguf.GGUFWriter(str(tmp_path / "p.gguf"), "gemma3")
    w.add_array("gemma3.attention.sliding_window_pattern", [True, True, False])
    w.add_array("gemma3.attention.head_count_kv", [2, 2, 2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    f = gguflm.GGUFFile(tmp_path / "p.gguf")
    assert _swa_layers(f.metadata, arch_spec("gemma3"), 3) == (True, True, False)
    key = next(k for k in KEY_TABLE if k.field == "n_head_kv")
    assert _check("gemma3.attention.head_count_kv", f.metadata["gemma3.attention.head_count_kv"], key) == 2
