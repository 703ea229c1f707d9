"""Plain float types: one element per block."""

from __future__ import annotations

import torch

from gguflm.gguf.types import GGMLType
from gguflm.quant.base import Blocks, QuantType, bf16_bits_to_f32


class F32(QuantType, ggml_type=GGMLType.F32):
    """y = x: the four bytes are the IEEE float32, little-endian (ggml has no to_float
    for F32; the identity is the definition)."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        return b.field("v").clone()  # (n, 1); a copy, never an alias of the file mapping


class F16(QuantType, ggml_type=GGMLType.F16):
    """y = GGML_FP16_TO_FP32(x): exact widening of IEEE half (ggml_fp16_to_fp32_row)."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        return b.field("v")  # (n, 1) float32


class BF16(QuantType, ggml_type=GGMLType.BF16):
    """y = bits(x << 16): bfloat16 is the top half of a float32 (ggml_bf16_to_fp32_row);
    NaN payloads pass through untouched."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        return bf16_bits_to_f32(b.field("v"))  # (n, 1)
