"""Mutation fuzzing of the reader: truncations at every offset, byte flips and huge
integers written over valid files. The only acceptable outcomes are a successful parse
(whose tensors then all lie inside the file) or GGUFError — fast, with bounded memory."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gguflm


@pytest.fixture(scope="module")
def sample_bytes(tmp_path_factory, write_sample) -> bytes:
    return write_sample(tmp_path_factory.mktemp("fuzz") / "s.gguf").read_bytes()


def parse_or_error(tmp_path, data: bytes) -> None:
    p = tmp_path / "m.gguf"
    p.write_bytes(data)
    t0 = time.perf_counter()
    try:
        f = gguflm.GGUFFile(p)
    except gguflm.GGUFError:
        pass
    else:
        for name, info in f.tensors.items():
            assert info.file_offset + info.nbytes <= len(data)
            assert len(f.tensor_data(name)) == info.nbytes
        f.close()
    assert time.perf_counter() - t0 < 2.0


def test_truncation_at_every_offset(tmp_path, sample_bytes):
    for n in range(len(sample_bytes)):
        p = tmp_path / "t.gguf"
        p.write_bytes(sample_bytes[:n])
        try:
            gguflm.GGUFFile(p)
        except gguflm.GGUFError:
            continue
        # only a cut inside the tensor data's trailing padding may still parse
        assert n >= len(sample_bytes) - 32, n


FUZZ = settings(max_examples=1500, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_flips(tmp_path, sample_bytes, flips):
    data = bytearray(sample_bytes)
    for pos, val in flips:
        data[pos % len(data)] = val
    parse_or_error(tmp_path, bytes(data))


@FUZZ
@given(pos=st.integers(0, 10**6),
       value=st.one_of(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**63 - 1, 2**64 - 1]),
                       st.integers(0, 2**64 - 1)),
       width=st.sampled_from([4, 8]))
def test_huge_integers(tmp_path, sample_bytes, pos, value, width):
    data = bytearray(sample_bytes)
    pos = pos % (len(data) - width)
    data[pos:pos + width] = struct.pack("<Q" if width == 8 else "<I", value % (1 << (8 * width)))
    parse_or_error(tmp_path, bytes(data))
