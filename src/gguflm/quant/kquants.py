"""K-quants: 256-value super-blocks split into 16- or 32-value sub-blocks, each with
its own small integer scale (and minimum) under one or two F16 super-scales.

Index convention in the docstrings: a super-block's output ``y[o]``, ``o = 0..255``;
``s = o // 16`` (or ``o // 32``) is the sub-block. Products are float32 in the order
ggml writes them; ``x - m`` after a product is a separate rounding (no FMA).
"""

from __future__ import annotations

import torch

from gguflm.gguf.types import GGMLType
from gguflm.quant.base import Blocks, QuantType, combine_like_c, scaled, split_bits


def scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> eight 6-bit scales and eight 6-bit mins.

    For j < 4: sc = b[j] & 63, m = b[j+4] & 63; for j >= 4:
    sc = (b[j+4] & 15) | (b[j-4] >> 6) << 4, m = (b[j+4] >> 4) | (b[j] >> 6) << 4.
    (n, 12) uint8 -> two (n, 8) uint8.
    """
    lo, mid, hi = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]  # (n, 4) each
    sc = torch.cat((lo & 63, (hi & 15) | ((lo >> 6) << 4)), dim=1)
    mn = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=1)
    return sc, mn


def scales_q3_k(scales: torch.Tensor) -> torch.Tensor:
    """The 12 packed bytes of Q3_K -> sixteen signed 6-bit scales (value - 32).

    Scale ``s = 4g + k`` (g, k in 0..3): low 4 bits = (b[4 * (g % 2) + k] >> 4 * (g // 2)) & 15,
    high 2 bits = (b[8 + k] >> 2g) & 3. (n, 12) uint8 -> (n, 16) int8.
    """
    n = scales.shape[0]
    low = split_bits(scales[:, 0:8].reshape(n, 2, 4), (0, 4), 4, dim=1)  # (n, g // 2, g % 2, k)
    high = split_bits(scales[:, 8:12], range(0, 8, 2), 2, dim=1)  # (n, g, k)
    return (low.view(n, 16) | (high.view(n, 16) << 4)).view(torch.int8) - 32


def two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """(n, 64) uint8 -> (n, 256) uint8 in K-quant order: for each 32-byte half ``c`` and
    shift ``j`` (0, 2, 4, 6 bits), the 2-bit fields of those 32 bytes:
    o = 128c + 32j + l <- (qs[32c + l] >> 2j) & 3."""
    n = qs.shape[0]
    return split_bits(qs.reshape(n, 2, 32), range(0, 8, 2), 2, dim=2).view(n, 256)  # (n, c, j, l)


def nibble_planes(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) uint8 -> (n, 256) uint8 in K-quant order: for each 32-byte chunk ``c``,
    its 32 low nibbles, then its 32 high nibbles (sub-block 2c, then 2c + 1)."""
    n = qs.shape[0]
    return split_bits(qs.reshape(n, 4, 32), (0, 4), 4, dim=2).view(n, 256)  # (n, c, half, l)


def bit_planes(qh: torch.Tensor, n_planes: int) -> torch.Tensor:
    """(n, 32) uint8 -> (n, n_planes * 32) uint8: plane p holds bit p of every byte."""
    return split_bits(qh, range(n_planes), 1, dim=1).view(qh.shape[0], n_planes * 32)


class Q2_K(QuantType, ggml_type=GGMLType.Q2_K):
    """Sixteen 16-value sub-blocks; sc = scales[s]:
    y[o] = (d * (sc & 15)) * q[o] - dmin * (sc >> 4), q = 2-bit fields (:func:`two_bit_planes`)."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n, sc = b.n, b.field("scales")  # (n, 16)
        d, dmin, finite = b.f16_pair("d", "dmin")  # (n, 1) each
        dl = scaled(sc & 15, d)  # (n, 16)
        ml = scaled(sc >> 4, dmin)  # (n, 16)
        y = scaled(two_bit_planes(b.field("qs")).view(n, 16, 16), dl.unsqueeze(-1))
        return combine_like_c(y, ml.unsqueeze(-1), dl, subtract=True, finite=finite).view(n, 256)


class Q3_K(QuantType, ggml_type=GGMLType.Q3_K):
    """Sixteen 16-value sub-blocks with 6-bit signed scales (:func:`scales_q3_k`):
    y[o] = (d * scale[s]) * (q2[o] - 4 * (1 - hbit[o])), q2 = 2-bit fields
    (:func:`two_bit_planes`), hbit[128c + 32j + l] = bit (4c + j) of hmask[l]."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        dl = scaled(scales_q3_k(b.field("scales")), b.field("d"))  # (n, 16)
        hbit = bit_planes(b.field("hmask"), 8)  # (n, 256): plane 4c + j, byte l
        q = two_bit_planes(b.field("qs")).bitwise_or_(hbit << 2).view(torch.int8).sub_(4)  # (n, 256)
        return scaled(q.view(n, 16, 16), dl.unsqueeze(-1)).view(n, 256)


class Q4_K(QuantType, ggml_type=GGMLType.Q4_K):
    """Eight 32-value sub-blocks with 6-bit scale/min (:func:`scale_min_k4`):
    y[o] = (d * sc[s]) * q[o] - dmin * m[s], q = nibbles (:func:`nibble_planes`)."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        sc, mn = scale_min_k4(b.field("scales"))  # (n, 8) each
        d, dmin, finite = b.f16_pair("d", "dmin")  # (n, 1) each
        d1, m1 = scaled(sc, d), scaled(mn, dmin)  # (n, 8) each
        y = scaled(nibble_planes(b.field("qs")).view(n, 8, 32), d1.unsqueeze(-1))
        return combine_like_c(y, m1.unsqueeze(-1), d1, subtract=True, finite=finite).view(n, 256)


class Q5_K(QuantType, ggml_type=GGMLType.Q5_K):
    """As Q4_K with a fifth bit: q[o] = nibble + 16 * (bit s of qh[o % 32]);
    y[o] = (d * sc[s]) * q[o] - dmin * m[s]."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        sc, mn = scale_min_k4(b.field("scales"))  # (n, 8) each
        d, dmin, finite = b.f16_pair("d", "dmin")  # (n, 1) each
        d1, m1 = scaled(sc, d), scaled(mn, dmin)  # (n, 8) each
        q = nibble_planes(b.field("qs")).bitwise_or_(bit_planes(b.field("qh"), 8) << 4)  # (n, 256)
        y = scaled(q.view(n, 8, 32), d1.unsqueeze(-1))
        return combine_like_c(y, m1.unsqueeze(-1), d1, subtract=True, finite=finite).view(n, 256)


class Q6_K(QuantType, ggml_type=GGMLType.Q6_K):
    """Sixteen 16-value sub-blocks, int8 scales: y[o] = (d * scales[s]) * (q[o] - 32),
    with o = 128h + 32p + l (half h, part p, l < 32):
    q = nibble p // 2 of ql[64h + 32 (p % 2) + l] | ((qh[32h + l] >> 2p) & 3) << 4."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        low = split_bits(b.field("ql").reshape(n, 2, 2, 32), (0, 4), 4, dim=2)  # (n, h, p // 2, p % 2, l)
        high = split_bits(b.field("qh").reshape(n, 2, 32), range(0, 8, 2), 2, dim=2)  # (n, h, p, l)
        q = low.view(n, 2, 4, 32).bitwise_or_(high << 4).view(torch.int8).sub_(32)
        dl = scaled(b.field("scales"), b.field("d"))  # (n, 16)
        return scaled(q.view(n, 16, 16), dl.unsqueeze(-1)).view(n, 256)


class Q8_K(QuantType, ggml_type=GGMLType.Q8_K):
    """y[o] = d * qs[o], d float32, qs int8 (bsums only serve dot products).
    libggml exports ``dequantize_row_q8_K`` although its type traits have no to_float."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        return scaled(b.field("qs"), b.field("d"))  # (n, 256)
