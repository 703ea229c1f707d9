"""The small-block types: one F16 scale (and maybe a minimum) per 32..128 values.

Element order inside a 32-block with 16 ``qs`` bytes: element ``j`` is the low nibble
of ``qs[j]``, element ``j + 16`` its high nibble (:func:`nibbles`).

Integer codes are built in uint8/int8, become float32 exactly, are multiplied by their
scale and get a minimum added in place (:func:`gguflm.quant.base.scaled`): on a CPU each
output-sized pass or temporary costs more than the arithmetic.
"""

from __future__ import annotations

import torch

from gguflm.gguf.types import GGMLType
from gguflm.quant.base import Blocks, QuantType, combine_like_c, scaled, split_bits


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) uint8 -> (n, 2k) uint8: the k low nibbles, then the k high nibbles."""
    n, k = qs.shape
    return split_bits(qs, (0, 4), 4, dim=1).view(n, 2 * k)


def bits_lsb_first(b: torch.Tensor, width: int = 1) -> torch.Tensor:
    """(n, k) uint8 -> (n, k * 8 // width) uint8: ``width``-bit fields of each byte,
    lowest first, bytes in order (little-endian bit stream)."""
    return split_bits(b, range(0, 8, width), width, dim=-1).flatten(-2)


def five_bit(qs: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """(n, 16) nibbles + (n, 4) high bits -> (n, 32) uint8 5-bit values: bit i of the
    little-endian uint32 ``qh`` is the fifth bit of element i (ggml's xh_0/xh_1)."""
    return nibbles(qs).bitwise_or_(bits_lsb_first(qh) << 4)


class Q4_0(QuantType, ggml_type=GGMLType.Q4_0):
    """y[j] = (q[j] - 8) * d, q the 4-bit nibbles (nibble order above), d = F16."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        return scaled(nibbles(b.field("qs")).view(torch.int8).sub_(8), b.field("d"))  # (n, 32)


class Q4_1(QuantType, ggml_type=GGMLType.Q4_1):
    """y[j] = q[j] * d + m, rounded after the product and after the sum (no FMA)."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        d, m, finite = b.f16_pair("d", "m")  # (n, 1) each
        return combine_like_c(scaled(nibbles(b.field("qs")), d), m, d, finite=finite)  # (n, 32)


class Q5_0(QuantType, ggml_type=GGMLType.Q5_0):
    """y[j] = (q[j] - 16) * d, q = nibble | (bit j of qh) << 4."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        q = five_bit(b.field("qs"), b.field("qh")).view(torch.int8).sub_(16)  # (n, 32)
        return scaled(q, b.field("d"))


class Q5_1(QuantType, ggml_type=GGMLType.Q5_1):
    """y[j] = q[j] * d + m, q = nibble | (bit j of qh) << 4; two roundings."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        d, m, finite = b.f16_pair("d", "m")  # (n, 1) each
        q = five_bit(b.field("qs"), b.field("qh"))  # (n, 32)
        return combine_like_c(scaled(q, d), m, d, finite=finite)


class Q8_0(QuantType, ggml_type=GGMLType.Q8_0):
    """y[j] = qs[j] * d, qs int8."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        return scaled(b.field("qs"), b.field("d"))  # (n, 32)


class Q1_0(QuantType, ggml_type=GGMLType.Q1_0):
    """y[j] = d if bit j of qs (LSB first) else -d; -d is a sign flip (NaN too)."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        d = b.field("d")  # (n, 1)
        bit = bits_lsb_first(b.field("qs")).bool()  # (n, 128)
        return torch.where(bit, d, -d)


class Q2_0(QuantType, ggml_type=GGMLType.Q2_0):
    """y[j] = (q[j] - 1) * d, q the 2-bit fields of qs, lowest first (00=-1 .. 11=+2)."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        q = bits_lsb_first(b.field("qs"), 2).view(torch.int8).sub_(1)  # (n, 64)
        return scaled(q, b.field("d"))
