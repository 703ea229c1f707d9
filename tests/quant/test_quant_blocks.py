"""Every type, bit for bit against libggml's own to_float, on synthetic blocks:
every byte value in every byte position, random blocks, and every combination of
special scale values (signed zeros, subnormals, inf, quiet and signalling NaN)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguflm.gguf.types import LAYOUTS, GGMLType
from gguflm.quant import dequantize, supported_types

SPECIAL_BITS = {
    "<f2": [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0x7BFF,
            0x7C00, 0xFC00, 0x7C01, 0xFC01, 0x7E00, 0xFE00, 0x7FFF, 0xFDFF],
    "<f4": [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x3F800000, 0x7F7FFFFF,
            0x7F800000, 0xFF800000, 0x7F800001, 0xFFC00001, 0x7FC00000, 0x7FFFFFFF],
}


def reference(oracle, raw: np.ndarray, t: GGMLType, n_elements: int) -> np.ndarray:
    """libggml's to_float; F32 has none in ggml (it is the identity), so numpy's
    little-endian float32 view of the bytes is the reference there."""
    if t == GGMLType.F32:
        return raw.view("<f4").copy()
    return oracle.ggml_to_float(raw, t, n_elements)


def sweep_blocks(t: GGMLType, rng: np.random.Generator) -> np.ndarray:
    """(n, type_size) uint8: two sweeps where every byte position takes all 256 values,
    512 random blocks, and one block per combination of special float scale values."""
    lay = LAYOUTS[t]
    pos = np.arange(lay.type_size)[None, :]
    i = np.arange(256)[:, None]
    parts = [(i + 97 * pos) % 256, (5 * i + 31 * pos + 7) % 256,
             rng.integers(0, 256, size=(512, lay.type_size))]
    floats = [(lay.offsets[f.name], f) for f in lay.fields if f.dtype in SPECIAL_BITS and f.count == 1]
    if floats and lay.block_size > 1:
        combos = list(itertools.product(*(SPECIAL_BITS[f.dtype] for _, f in floats)))
        special = rng.integers(0, 256, size=(len(combos), lay.type_size))
        for row, combo in zip(special, combos):
            for (off, f), bits in zip(floats, combo):
                row[off:off + f.nbytes] = np.frombuffer(np.array(bits, dtype="<u8").tobytes()[:f.nbytes], np.uint8)
        parts.append(special)
    return np.ascontiguousarray(np.concatenate(parts).astype(np.uint8))


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    g, w = got.reshape(-1).view(np.uint32), want.reshape(-1).view(np.uint32)
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, (f"{what}: {bad.size} of {g.size} values differ; first at {bad[:4].tolist()}: "
                           f"ours {[hex(x) for x in g[bad[:4]]]} libggml {[hex(x) for x in w[bad[:4]]]}")


@pytest.mark.parametrize("t", supported_types(), ids=lambda t: t.name)
def test_bit_identical_to_libggml(oracle, dequantize_paths, t):
    lay = LAYOUTS[t]
    blocks = sweep_blocks(t, np.random.default_rng(int(t)))
    n = blocks.shape[0]
    want = reference(oracle, blocks.reshape(-1), t, n * lay.block_size)
    for path, dq in dequantize_paths.items():
        got = dq(blocks.reshape(-1), t, (lay.block_size, n))
        assert tuple(got.shape) == (n, lay.block_size)
        assert_bits_equal(got.numpy(), want, f"{t.name} ({path})")


def test_every_type_libggml_can_dequantize_is_supported(oracle):
    from gguflm.verify.ggml_oracle import has_to_float

    missing = [t.name for t in GGMLType if has_to_float(t) and t not in supported_types()]
    assert not missing


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.sampled_from(supported_types()), rows=st.integers(1, 3), blocks_per_row=st.integers(1, 5),
       planes=st.integers(1, 2), data=st.data())
def test_random_tensors_any_shape(oracle, dequantize_paths, t, rows, blocks_per_row, planes, data):
    lay = LAYOUTS[t]
    n_blocks = rows * blocks_per_row * planes
    raw = np.frombuffer(data.draw(st.binary(min_size=n_blocks * lay.type_size, max_size=n_blocks * lay.type_size)),
                        dtype=np.uint8)
    shape = (lay.block_size * blocks_per_row, rows, planes)
    want = reference(oracle, raw, t, n_blocks * lay.block_size)
    for path, dq in dequantize_paths.items():
        got = dq(raw, t, shape)
        assert tuple(got.shape) == tuple(reversed(shape))
        assert_bits_equal(got.numpy(), want, f"{t.name} ({path})")


@pytest.mark.cuda
@pytest.mark.parametrize("t", supported_types(), ids=lambda t: t.name)
def test_cuda_matches_libggml(oracle, t):
    """On a GPU every non-NaN value is bit-identical and every NaN is where libggml puts
    one; the payload of a computed NaN is the GPU's canonical NaN (CUDA arithmetic does
    not propagate payloads), so only NaN positions are compared."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    lay = LAYOUTS[t]
    blocks = sweep_blocks(t, np.random.default_rng(int(t)))
    n = blocks.shape[0]
    got = dequantize(blocks.reshape(-1), t, (lay.block_size, n), device="cuda").cpu().numpy().reshape(-1)
    want = reference(oracle, blocks.reshape(-1), t, n * lay.block_size)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert_bits_equal(got[~nan], want[~nan], f"{t.name} on CUDA")
