"""The small-block types: one F16 scale (and maybe a minimum) per 32..128 values.

Element order inside a 32-block with 16 ``qs`` bytes: element ``j`` is the low nibble
of ``qs[j]``, element ``j + 16`` its high nibble (:func:`nibbles_f32`).

Integer codes become float32 exactly, are multiplied by their scale (``torch.mul`` of an
integer and a float tensor converts, then multiplies) and get a minimum added in place:
each extra output-sized temporary costs more than the arithmetic on a CPU.
"""

from __future__ import annotations

import torch

from gguflm.gguf.types import GGMLType
from gguflm.quant.base import Blocks, QuantType, combine_like_c, table


def nibbles_f32(qs: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(n, k) uint8 -> (n, 2k) float32: ``nibble + offset`` of the k low nibbles, then
    of the k high nibbles. The strided field is made contiguous first (byte ops on it
    are several times slower), and the values are converted straight into the output."""
    n, k = qs.shape
    qs = qs.contiguous()
    lo, hi = qs & 0x0F, qs >> 4
    if offset:
        lo, hi = lo.view(torch.int8) + offset, hi.view(torch.int8) + offset
    out = torch.empty((n, 2, k), dtype=torch.float32, device=qs.device)
    out[:, 0].copy_(lo)
    out[:, 1].copy_(hi)
    return out.view(n, 2 * k)


def bits_lsb_first(b: torch.Tensor, width: int = 1) -> torch.Tensor:
    """(n, k) uint8 -> (n, k * 8 // width) uint8: ``width``-bit fields of each byte,
    lowest first, bytes in order (little-endian bit stream)."""
    shifts = table(range(0, 8, width), torch.uint8, b.device)  # (8 / width,)
    return ((b.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).flatten(-2)


def five_bit(qs: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """(n, 16) nibbles + (n, 4) high bits -> (n, 32) uint8 5-bit values: bit i of the
    little-endian uint32 ``qh`` is the fifth bit of element i (ggml's xh_0/xh_1)."""
    qs = qs.contiguous()
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1) | (bits_lsb_first(qh) << 4)


class Q4_0(QuantType, ggml_type=GGMLType.Q4_0):
    """y[j] = (q[j] - 8) * d, q the 4-bit nibbles (nibble order above), d = F16."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        return nibbles_f32(b.field("qs"), -8).mul_(b.field("d"))  # (n, 32) * (n, 1)


class Q4_1(QuantType, ggml_type=GGMLType.Q4_1):
    """y[j] = q[j] * d + m, rounded after the product and after the sum (no FMA)."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        d = b.field("d")  # (n, 1)
        return combine_like_c(nibbles_f32(b.field("qs")).mul_(d), b.field("m"), d)  # (n, 32)


class Q5_0(QuantType, ggml_type=GGMLType.Q5_0):
    """y[j] = (q[j] - 16) * d, q = nibble | (bit j of qh) << 4."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        q = five_bit(b.field("qs"), b.field("qh")).view(torch.int8) - 16  # (n, 32)
        return torch.mul(q, b.field("d"))


class Q5_1(QuantType, ggml_type=GGMLType.Q5_1):
    """y[j] = q[j] * d + m, q = nibble | (bit j of qh) << 4; two roundings."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        d = b.field("d")  # (n, 1)
        q = five_bit(b.field("qs"), b.field("qh"))  # (n, 32)
        return combine_like_c(torch.mul(q, d), b.field("m"), d)


class Q8_0(QuantType, ggml_type=GGMLType.Q8_0):
    """y[j] = qs[j] * d, qs int8."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        return b.field("qs").to(torch.float32).mul_(b.field("d"))  # (n, 32)


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
        q = bits_lsb_first(b.field("qs"), 2).view(torch.int8) - 1  # (n, 64)
        return torch.mul(q, b.field("d"))
