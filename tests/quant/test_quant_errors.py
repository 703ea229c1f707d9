"""Inconsistent input raises GGUFError naming the problem; the result shape and
device follow the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gguflm
from gguflm.errors import GGUFError
from gguflm.gguf.types import LAYOUTS, GGMLType
from gguflm.quant import dequantize, quant_type


def test_wrong_byte_count():
    lay = LAYOUTS[GGMLType.Q4_K]
    raw = np.zeros(2 * lay.type_size + 1, np.uint8)
    with pytest.raises(GGUFError, match=r"Q4_K .* needs 288 bytes .* got 289"):
        dequantize(raw, GGMLType.Q4_K, (512,))


def test_short_buffer():
    with pytest.raises(GGUFError, match="Q8_0"):
        dequantize(np.zeros(33, np.uint8), GGMLType.Q8_0, (32,))


def test_row_not_multiple_of_block():
    # 2 rows of 48: 96 elements would be 3 whole blocks of 32, but rows may not split blocks.
    raw = np.zeros(3 * LAYOUTS[GGMLType.Q4_0].type_size, np.uint8)
    with pytest.raises(GGUFError, match=r"ne0=48 .* block size 32"):
        dequantize(raw, GGMLType.Q4_0, (48, 2))


@pytest.mark.parametrize("type_id", [4, 5, 31, 43, 999, -1])
def test_unknown_type_id(type_id):
    with pytest.raises(GGUFError, match=f"type id {type_id}"):
        dequantize(np.zeros(18, np.uint8), type_id, (32,))


@pytest.mark.parametrize("t", [GGMLType.Q8_1, GGMLType.I8, GGMLType.I32, GGMLType.F64])
def test_type_without_to_float(t):
    with pytest.raises(GGUFError, match=t.name):
        quant_type(t)


def test_negative_dimension():
    with pytest.raises(GGUFError, match="shape"):
        dequantize(np.zeros(0, np.uint8), GGMLType.F32, (4, -1))


def test_public_entry_point_and_shape_contract():
    raw = np.arange(2 * 3 * 4, dtype="<f4").view(np.uint8)
    out = gguflm.dequantize(raw, GGMLType.F32, (4, 3, 2))
    assert out.dtype == torch.float32 and tuple(out.shape) == (2, 3, 4)
    assert np.array_equal(out.numpy().reshape(-1), np.arange(24, dtype=np.float32))


def test_empty_tensor():
    out = dequantize(np.zeros(0, np.uint8), GGMLType.Q4_K, (256, 0))
    assert tuple(out.shape) == (0, 256)


def test_torch_input_and_device_argument():
    raw = np.random.default_rng(1).integers(0, 256, 4 * 18, dtype=np.uint8)
    a = dequantize(raw, GGMLType.Q4_0, (64, 2))
    b = dequantize(torch.from_numpy(raw), GGMLType.Q4_0, (64, 2), device="cpu")
    assert b.device.type == "cpu"
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_read_only_buffer_is_not_written_and_result_is_independent():
    raw = np.arange(8, dtype="<f4").view(np.uint8)
    raw.flags.writeable = False
    out = dequantize(raw, GGMLType.F32, (8,))
    out += 1  # must not touch the source bytes
    assert np.array_equal(raw.view("<f4"), np.arange(8, dtype=np.float32))
