"""Every tensor of the real SmolLM2 file and of its requantizations by llama.cpp's own
quantizer, bit for bit against libggml's to_float."""

from __future__ import annotations

import numpy as np
import pytest

import gguflm
from gguflm.gguf.types import GGMLType
from gguflm.quant import dequantize

# llama.cpp ftype -> a tensor type the requantized file must contain. SmolLM2's 576-wide
# rows are not multiples of 256, so K/IQ mixes fall back to Q4_0/Q5_0/IQ4_NL there and
# only the 1536-wide ffn_down keeps a 256-block type: Q3_K_M gives no Q3_K tensor (its
# ffn_down is Q4_K) and Q2_K none of Q2_K (ffn_down is Q3_K). The block tests carry those.
REQUANTIZATIONS = {
    "Q4_0": GGMLType.Q4_0, "Q4_K_M": GGMLType.Q4_K, "Q5_K_M": GGMLType.Q5_K, "Q6_K": GGMLType.Q6_K,
    "Q8_0": GGMLType.Q8_0, "Q3_K_M": GGMLType.Q4_K, "Q2_K": GGMLType.Q3_K, "IQ4_NL": GGMLType.IQ4_NL,
    "IQ4_XS": GGMLType.IQ4_XS, "F16": GGMLType.F16,
}


def check_file(oracle, dequantize_paths, path) -> set[GGMLType]:
    """Compare every tensor, through every CPU dequantization path; return the types seen."""
    seen = set()
    with gguflm.GGUFFile(path) as f:
        for name, info in f.tensors.items():
            raw = f.tensor_data(name)
            n = int(np.prod(info.shape))
            want = (raw.view("<f4") if info.ggml_type == GGMLType.F32
                    else oracle.ggml_to_float(raw, info.ggml_type, n))
            for dq_path, dq in dequantize_paths.items():
                got = dq(raw, info.ggml_type, info.shape)
                assert tuple(got.shape) == tuple(reversed(info.shape)), name
                g, w = got.numpy().reshape(-1).view(np.uint32), want.view(np.uint32)
                if not np.array_equal(g, w):
                    bad = np.flatnonzero(g != w)
                    pytest.fail(f"{name} ({info.ggml_type.name}, {dq_path}): {bad.size} of {n} values differ, "
                                f"first at {bad[:4]}")
            seen.add(info.ggml_type)
    return seen


@pytest.mark.slow
def test_smollm2_q4_1(oracle, dequantize_paths, smollm2_path):
    assert GGMLType.Q4_1 in check_file(oracle, dequantize_paths, smollm2_path)


@pytest.mark.slow
@pytest.mark.parametrize("ftype", list(REQUANTIZATIONS))
def test_requantized(oracle, dequantize_paths, requantized, ftype):
    assert REQUANTIZATIONS[ftype] in check_file(oracle, dequantize_paths, requantized(ftype))
