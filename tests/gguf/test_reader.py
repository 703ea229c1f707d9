"""The GGUF reader against the official `gguf` package's reader (the oracle for valid
files), and against hand-made hostile files (every one must raise GGUFError)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

import gguflm
from gguflm.gguf.reader import ValueType

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def sample(tmp_path_factory, write_sample) -> Path:
    return write_sample(tmp_path_factory.mktemp("gguf") / "sample.gguf")


def _oracle_value(field) -> object:
    """Decode a gguf.ReaderField to a plain Python value (the official reader's view)."""
    return field.contents()


def assert_matches_oracle(path: Path) -> None:
    ours = gguflm.GGUFFile(path)
    ref = gguf.GGUFReader(str(path))
    ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == ref_keys
    for k in ref_keys:
        want = _oracle_value(ref.fields[k])
        got = ours.metadata[k]
        if ours.metadata_types[k][:2] == (ValueType.ARRAY, ValueType.ARRAY):
            got = [x for sub in got for x in sub]  # gguf-py's contents() flattens nested arrays
        if isinstance(want, float):
            assert np.float64(got) == np.float64(want), k
        else:
            assert got == want, k
        assert ours.metadata_types[k][0] == int(ref.fields[k].types[0]), k
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(x) for x in t.shape)
        assert info.ggml_type == int(t.tensor_type)
        assert info.file_offset == int(t.data_offset)
        assert info.nbytes == int(t.n_bytes)
        raw = ours.tensor_data(t.name)
        assert raw.dtype == np.uint8 and not raw.flags.writeable
        assert np.array_equal(raw, np.asarray(t.data).view(np.uint8).reshape(-1))


def test_sample_matches_official_reader(sample):
    assert_matches_oracle(sample)
    f = gguflm.GGUFFile(sample)
    assert f.metadata["t.str"] == "héllo ▁ wörld 🙂"
    assert f.metadata["t.arr_nested"] == [[1, 2], [3]]
    assert f.metadata_types["t.arr_nested"] == (ValueType.ARRAY, ValueType.ARRAY, ValueType.INT32)
    assert f.metadata["t.bool"] is True
    assert f.version == 3


def test_custom_alignment(tmp_path, write_sample):
    p = write_sample(tmp_path / "al.gguf", alignment=64)
    assert_matches_oracle(p)
    f = gguflm.GGUFFile(p)
    assert f.alignment == 64 and f.data_offset % 64 == 0


def test_version_2_is_read(tmp_path, sample):
    data = bytearray(sample.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    p = tmp_path / "v2.gguf"
    p.write_bytes(bytes(data))
    f = gguflm.GGUFFile(p)
    assert f.version == 2 and "a.weight" in f.tensors


def test_smollm2_matches_official_reader(smollm2_path):
    assert_matches_oracle(smollm2_path)
    f = gguflm.GGUFFile(smollm2_path)
    emb = f.tensors["token_embd.weight"]
    assert emb.shape == (576, 49152)  # ggml order: ne0 = n_embd, a row per token
    assert isinstance(emb.ggml_type, gguflm.GGMLType)


def _resident_kb(f) -> int:
    """Resident kB of ``f``'s own mapping of its file (/proc/self/smaps), found by the
    address of a tensor view: other mappings of the same file in this process (models
    loaded by earlier tests) do not count."""
    t = next(iter(f.tensors.values()))
    base = f.tensor_data(t.name).__array_interface__["data"][0] - t.file_offset
    kb, ours = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            ours = lo <= base < hi
        elif ours and fields[0] == "Rss:":
            kb += int(fields[1])
    return kb


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps (Linux)")
def test_release_header_unmaps_the_parsed_header(smollm2_path):
    f = gguflm.GGUFFile(smollm2_path.resolve())
    before = _resident_kb(f)
    assert before * 1024 >= f.data_offset // 2  # parsing mapped the header (1.7 MB: the vocabulary)
    f.release_header()
    assert _resident_kb(f) * 8 < before
    fresh = gguflm.GGUFFile(smollm2_path)  # what was parsed, and views into the header, read the same
    assert all(f.metadata[k] == v for k, v in fresh.metadata.items())
    assert np.array_equal(f.tensor_data("token_embd.weight"), fresh.tensor_data("token_embd.weight"))


def test_tensor_data_is_zero_copy(sample):
    f = gguflm.GGUFFile(sample)
    a = f.tensor_data("a.weight")
    b = f.tensor_data("a.weight")
    assert np.shares_memory(a, b)
    with pytest.raises(KeyError, match="no tensor named"):
        f.tensor_data("nope")


# --- hostile files -----------------------------------------------------------------------

def gguf_bytes(kvs: list[bytes] = (), tensors: list[bytes] = (), *, version=3, n_kv=None,
               n_tensors=None, tail: bytes = b"") -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    return head + b"".join(kvs) + b"".join(tensors) + tail


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name: str, dims, gtype: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", gtype, offset)


HOSTILE = {
    "empty": (b"", "empty file"),
    "bad magic": (b"GGML" + b"\0" * 20, "bad magic"),
    "version 1": (gguf_bytes(version=1), "unsupported GGUF version 1"),
    "big endian": (b"GGUF" + struct.pack(">I", 3) + b"\0" * 16, "big-endian"),
    "truncated header": (b"GGUF\3\0\0\0\0\0", "truncated"),
    "huge kv count": (gguf_bytes(n_kv=2**63), "metadata count"),
    "huge tensor count": (gguf_bytes(n_tensors=2**64 - 1), "tensor count"),
    "huge key length": (gguf_bytes([struct.pack("<Q", 2**63) + b"k" * 32]), "limit"),
    "string past end": (gguf_bytes([kv("k", 8, struct.pack("<Q", 1000) + b"abc")]), "truncated"),
    "array length 2^63": (gguf_bytes([kv("k", 9, struct.pack("<IQ", 0, 2**63))]), "array length"),
    "string array huge": (gguf_bytes([kv("k", 9, struct.pack("<IQ", 8, 2**40))]), "array length"),
    "unknown value type": (gguf_bytes([kv("k", 13, b"\0" * 8)]), "unknown value type 13"),
    "unknown element type": (gguf_bytes([kv("k", 9, struct.pack("<IQ", 99, 1))]), "unknown value type 99"),
    "deep nesting": (gguf_bytes([kv("k", 9, struct.pack("<IQ", 9, 1) * 10 + struct.pack("<IQ", 0, 0))]),
                     "nesting"),
    "bad utf8 key": (gguf_bytes([s(b"\xff\xfe") + struct.pack("<IB", 0, 1)]), "UTF-8"),
    "bad utf8 value": (gguf_bytes([kv("k", 8, s(b"a\xc3"))]), "UTF-8"),
    "duplicate key": (gguf_bytes([kv("k", 0, b"\1"), kv("k", 0, b"\2")]), "duplicate metadata key"),
    "empty key": (gguf_bytes([kv("", 0, b"\1")], tail=b"\0" * 8), "empty"),
    "bool not 0/1": (gguf_bytes([kv("k", 7, b"\x07")]), "bool"),
    "alignment not pow2": (gguf_bytes([kv("general.alignment", 4, struct.pack("<I", 48))]), "power of two"),
    "alignment zero": (gguf_bytes([kv("general.alignment", 4, struct.pack("<I", 0))]), "power of two"),
    "alignment huge": (gguf_bytes([kv("general.alignment", 4, struct.pack("<I", 2**31))]), "power of two"),
    "alignment wrong type": (gguf_bytes([kv("general.alignment", 10, struct.pack("<Q", 32))]), "UINT32"),
    "n_dims 5": (gguf_bytes(tensors=[tinfo("t", [1, 1, 1, 1, 1])]), "n_dims 5"),
    "n_dims 0": (gguf_bytes(tensors=[tinfo("t", [])]), "n_dims 0"),
    "dim zero": (gguf_bytes(tensors=[tinfo("t", [4, 0])]), "invalid dimension 0"),
    "dim overflow": (gguf_bytes(tensors=[tinfo("t", [2**32, 2**32, 2**32])]), "overflow"),
    "dim 2^64-1": (gguf_bytes(tensors=[tinfo("t", [2**64 - 1])]), "invalid dimension"),
    "unknown type": (gguf_bytes(tensors=[tinfo("t", [32], gtype=4)]), "unknown ggml type id 4"),
    "type 255": (gguf_bytes(tensors=[tinfo("t", [32], gtype=255)]), "unknown ggml type id 255"),
    "ne0 not multiple": (gguf_bytes(tensors=[tinfo("t", [33], gtype=2)]), "not a multiple of Q4_0"),
    "offset unaligned": (gguf_bytes(tensors=[tinfo("t", [8], offset=4)]), "alignment"),
    "data past end": (gguf_bytes(tensors=[tinfo("t", [1 << 40])]), "past the end"),
    "data start past end": (gguf_bytes(tensors=[tinfo("t", [1])]), "past the end"),
    "duplicate tensor": (gguf_bytes(tensors=[tinfo("t", [8]), tinfo("t", [8], offset=32)], tail=b"\0" * 128),
                         "duplicate tensor name"),
    "overlap": (gguf_bytes(tensors=[tinfo("t", [16]), tinfo("u", [8], offset=32)], tail=b"\0" * 256),
                "overlap"),
    "empty tensor name": (gguf_bytes(tensors=[tinfo("", [8])], tail=b"\0" * 64), "empty name"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_raise_gguf_error(tmp_path, case):
    data, message = HOSTILE[case]
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(gguflm.GGUFError, match=message):
        gguflm.GGUFFile(p)


def test_gguf_error_is_value_error():
    assert issubclass(gguflm.GGUFError, ValueError)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(gguflm.GGUFError, match="directory"):
        gguflm.GGUFFile(tmp_path)
    with pytest.raises(FileNotFoundError):
        gguflm.GGUFFile(tmp_path / "missing.gguf")


def test_small_hostile_file_allocates_little(tmp_path):
    """A 160-byte file claiming gigantic arrays must fail fast without allocating."""
    import time
    import tracemalloc

    data = gguf_bytes([kv("a", 9, struct.pack("<IQ", 9, 2**62)),
                       kv("b", 9, struct.pack("<IQ", 0, 2**30))])
    data = data[:160].ljust(160, b"\0")
    p = tmp_path / "small.gguf"
    p.write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(gguflm.GGUFError):
        gguflm.GGUFFile(p)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 1 << 20
