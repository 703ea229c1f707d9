"""FP4 (E2M1) microscaling types: 4-bit floats under a shared power-of-two (MXFP4) or
FP8 (NVFP4) scale. The 4-bit codes index ``kvalues_fp4``, the E2M1 values doubled;
the scale decoders halve to compensate."""

from __future__ import annotations

import math

import torch

from gguflm.gguf.types import GGMLType
from gguflm.quant import tables
from gguflm.quant.base import Blocks, QuantType, lookup, split_bits, table


def e8m0_half_bits(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half: the float32 bits of 2**(e - 128) for an E8M0 byte e.

    e >= 2: (e - 1) << 23 (a normal number); e < 2: the subnormals 0x00200000 << e.
    e = 255 is not NaN here (ggml does not special-case it). int32 in, int32 out.
    """
    return torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)


def ue4m3_half(x: int) -> float:
    """ggml_ue4m3_to_fp32 of one byte: unsigned E4M3 (bias 7, sign bit ignored),
    0x00 and 0x7F -> 0, then halved. Every result is exact in float32."""
    if x in (0, 0x7F):
        return 0.0
    exp, man = (x >> 3) & 0xF, x & 0x7
    raw = math.ldexp(man, -9) if exp == 0 else math.ldexp(1.0 + man / 8.0, exp - 7)
    return raw * 0.5


_UE4M3_HALF = tuple(ue4m3_half(x) for x in range(256))


def fp4_pairs(qs: torch.Tensor) -> torch.Tensor:
    """(..., k) uint8 -> (..., 2k) float32 kvalues_fp4 of the k low nibbles, then the k high."""
    kv = table(tables.KVALUES_FP4, torch.float32, qs.device)
    return lookup(kv, split_bits(qs, (0, 4), 4, dim=-2)).flatten(-2)


class MXFP4(QuantType, ggml_type=GGMLType.MXFP4):
    """32 values: y[j] = kvalues_fp4[nibble j] * 2**(e - 128) (:func:`e8m0_half_bits`),
    nibble order as Q4_0."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        d = e8m0_half_bits(b.field("e").to(torch.int32)).view(torch.float32)  # (n, 1)
        return fp4_pairs(b.field("qs")).mul_(d)  # (n, 32)


class NVFP4(QuantType, ggml_type=GGMLType.NVFP4):
    """64 values in four 16-value sub-blocks s, each with a UE4M3 scale byte d[s]:
    y[16s + j] = kvalues_fp4[nibble] * ue4m3(d[s]) / 2, from qs[8s .. 8s + 7] low
    nibbles then high nibbles."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        scale = lookup(table(_UE4M3_HALF, torch.float32, b.data.device), b.field("d"))  # (n, 4)
        y = fp4_pairs(b.field("qs").view(n, 4, 8))  # (n, 4, 16)
        return y.mul_(scale.unsqueeze(-1)).view(n, 64)
