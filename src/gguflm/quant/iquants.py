"""I-quants: values taken from fixed codebooks (``tables``) rather than from a linear
range. 256-value super-blocks (IQ4_NL: 32) with one F16 scale; codebook rows of 8 (or
4) values are picked by an index, signs by a sign byte.

Sign bytes: bit j set -> value j is negated. IQ2_XXS/IQ2_XS/IQ3_XXS store 7 bits and
expand them through ``ksigns_iq2xs`` (:func:`tables.ksigns`); IQ2_S/IQ3_S store whole
bytes. The sign is applied after the scale product, as a sign flip (:func:`apply_signs`).
"""

from __future__ import annotations

import functools

import torch

from gguflm.gguf.types import GGMLType
from gguflm.quant import tables
from gguflm.quant.base import Blocks, QuantType, f16_bits_to_f32, lookup, reinterpret, scaled, split_bits, table


@functools.cache
def _sign_rows(device: torch.device) -> torch.Tensor:
    """(256, 8) int32: row b holds the float sign bit (0x80000000) where bit j of b is set."""
    bits = (torch.arange(256, dtype=torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1
    return (bits << 31).to(device)


@functools.cache
def _ksign_rows(device: torch.device) -> torch.Tensor:
    """(128, 8) int32: the sign-bit rows of ksigns_iq2xs[i]."""
    return _sign_rows(device)[torch.tensor(tables.ksigns(), device=device)]


def apply_signs(y: torch.Tensor, sign_bytes: torch.Tensor, seven_bit: bool) -> torch.Tensor:
    """Negate y (..., 8) float32 in place where the sign bits of ``sign_bytes`` (...) are set.

    ggml writes ``y * (bit ? -1.f : 1.f)`` and gcc turns it into a sign flip, which also
    flips the sign of a NaN; an XOR of the sign bit does exactly that on every device.
    ``seven_bit``: the bytes are ksigns_iq2xs indices rather than sign bytes.
    """
    rows = _ksign_rows(y.device) if seven_bit else _sign_rows(y.device)
    y.view(torch.int32).bitwise_xor_(lookup(rows, sign_bytes))
    return y


def grid(g: tables.Grid, idx: torch.Tensor) -> torch.Tensor:
    """(...) row indices -> (..., width) float32 codebook values."""
    return lookup(tables.grid_f32(g, idx.device), idx)


def u32_words(b: torch.Tensor) -> torch.Tensor:
    """(..., 4k) uint8 -> (..., k) int32 holding the little-endian uint32 bit patterns."""
    return reinterpret(b, torch.int32)


def half_scales(scales: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """IQ2_XS/IQ2_S sub-scales: (n, 8) bytes -> (n, 16) float32,
    d * (0.5 + nibble) * 0.25 for the low nibble (first 16 values), then the high."""
    n = scales.shape[0]
    nib = split_bits(scales, (0, 4), 4, dim=-1).view(n, 16)
    return (nib + 0.5).mul_(d).mul_(0.25)


class IQ2_XXS(QuantType, ggml_type=GGMLType.IQ2_XXS):
    """Eight 32-value sub-blocks of 8 bytes: bytes 0..3 pick iq2xxs_grid rows (8 values
    each); u32 w = bytes 4..7: scale = d * (0.5 + (w >> 28)) * 0.25, signs of row l =
    ksigns[(w >> 7l) & 127]. y = scale * grid * ±1."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        q = b.bytes("qs").reshape(n, 8, 8)  # (n, sub-block, byte)
        w = u32_words(q[:, :, 4:8]).reshape(n, 8, 1)  # (n, 8, 1)
        sidx = (w >> table(range(0, 28, 7), torch.int32, q.device)) & 127  # (n, 8, 4)
        db = (((w.squeeze(-1) >> 28) & 15) + 0.5).mul_(b.field("d")).mul_(0.25)  # (n, 8)
        y = grid(tables.IQ2XXS_GRID, q[:, :, 0:4]).mul_(db.view(n, 8, 1, 1))  # (n, 8, 4, 8)
        return apply_signs(y, sidx, seven_bit=True).view(n, 256)


class IQ2_XS(QuantType, ggml_type=GGMLType.IQ2_XS):
    """32 uint16 codes, one per 8 values: row = code & 511 of iq2xs_grid, signs =
    ksigns[code >> 9]; 16-value scales from the nibbles of scales[8] (:func:`half_scales`).
    y = scale * grid * ±1."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        codes = b.field("qs")  # (n, 32) int32
        db = half_scales(b.field("scales"), b.field("d"))  # (n, 16)
        y = grid(tables.IQ2XS_GRID, codes & 511).view(n, 16, 16).mul_(db.unsqueeze(-1))
        return apply_signs(y.view(n, 32, 8), codes >> 9, seven_bit=True).view(n, 256)


class IQ2_S(QuantType, ggml_type=GGMLType.IQ2_S):
    """qs[0:32] low 8 bits of 32 iq2s_grid rows, bits 8..9 of row 4ib + l are
    (qh[ib] >> 2l) & 3; qs[32:64] are plain sign bytes; scales as IQ2_XS.
    y = scale * grid * ±1."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        qs = b.field("qs")  # (n, 64)
        high = (b.field("qh").view(n, 8, 1) >> table(range(0, 8, 2), torch.uint8, qs.device)) & 3  # (n, 8, 4)
        rows = qs[:, :32].to(torch.int32) | (high.view(n, 32).to(torch.int32) << 8)  # (n, 32)
        db = half_scales(b.field("scales"), b.field("d"))  # (n, 16)
        y = grid(tables.IQ2S_GRID, rows).view(n, 16, 16).mul_(db.unsqueeze(-1))
        return apply_signs(y.view(n, 32, 8), qs[:, 32:], seven_bit=False).view(n, 256)


class IQ3_XXS(QuantType, ggml_type=GGMLType.IQ3_XXS):
    """qs[0:64] pick iq3xxs_grid rows of 4 values (8 per 32-value sub-block);
    qs[64:96] are 8 u32 w: scale = d * (0.5 + (w >> 28)) * 0.5, signs of the 8 values
    l = ksigns[(w >> 7l) & 127]. y = scale * grid * ±1."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        qs = b.field("qs")  # (n, 96)
        w = u32_words(qs[:, 64:96]).view(n, 8, 1)  # (n, 8, 1)
        sidx = (w >> table(range(0, 28, 7), torch.int32, qs.device)) & 127  # (n, 8, 4)
        db = (((w.squeeze(-1) >> 28) & 15) + 0.5).mul_(b.field("d")).mul_(0.5)  # (n, 8)
        y = grid(tables.IQ3XXS_GRID, qs[:, :64]).view(n, 8, 4, 8).mul_(db.view(n, 8, 1, 1))
        return apply_signs(y, sidx, seven_bit=True).view(n, 256)


class IQ3_S(QuantType, ggml_type=GGMLType.IQ3_S):
    """Sub-block ib (32 values): rows t = 0..7 of iq3s_grid (4 values each) are
    qs[8ib + t] | ((qh[ib] >> t) & 1) << 8; sign bytes signs[4ib + l] cover 8 values;
    scale = d * (1 + 2 * nibble ib % 2 of scales[ib // 2]). y = scale * grid * ±1."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        qs = b.field("qs").view(n, 8, 8)  # (n, ib, t)
        high = (b.field("qh").view(n, 8, 1) >> table(range(8), torch.uint8, qs.device)) & 1  # (n, ib, t)
        rows = qs.to(torch.int32) | (high.to(torch.int32) << 8)
        sc = b.field("scales")  # (n, 4)
        nib = split_bits(sc, (0, 4), 4, dim=-1).view(n, 8).to(torch.int32)
        db = scaled(1 + 2 * nib, b.field("d"))  # (n, 8)
        y = grid(tables.IQ3S_GRID, rows).view(n, 8, 4, 8).mul_(db.view(n, 8, 1, 1))
        return apply_signs(y, b.field("signs").view(n, 8, 4), seven_bit=False).view(n, 256)


class IQ1_S(QuantType, ggml_type=GGMLType.IQ1_S):
    """Sub-block ib with h = qh[ib] (uint16): rows l = 0..3 of iq1s_grid (values -1, 0,
    1) are qs[4ib + l] | ((h >> 3l) & 7) << 8; scale = d * (2 * ((h >> 12) & 7) + 1);
    delta = -0.125 if h & 0x8000 else 0.125. y = scale * (grid + delta)."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        h = b.field("qh").view(n, 8, 1)  # (n, 8, 1) int32
        high = (h >> table(range(0, 12, 3), torch.int32, h.device)) & 7  # (n, 8, 4)
        rows = b.field("qs").view(n, 8, 4).to(torch.int32) | (high << 8)
        dl = scaled(2 * ((h >> 12) & 7) + 1, b.field("d").view(n, 1, 1))  # (n, 8, 1)
        delta = torch.where((h & 0x8000) != 0, -tables.IQ1_DELTA, tables.IQ1_DELTA)  # (n, 8, 1)
        y = grid(tables.IQ1S_GRID, rows).add_(delta.view(n, 8, 1, 1))  # (n, 8, 4, 8)
        return y.mul_(dl.view(n, 8, 1, 1)).view(n, 256)


class IQ1_M(QuantType, ggml_type=GGMLType.IQ1_M):
    """No stored d: the F16 bits are the top nibbles of the four uint16 ``scales`` words
    sc[0..3] (sc[0] >> 12 | (sc[1] >> 8) & 0xf0 | (sc[2] >> 4) & 0xf00 | sc[3] & 0xf000).
    Row l of sub-block ib: nibble v = (qh[2ib + l // 2] >> 4 (l % 2)) & 15, iq1s_grid row
    qs[4ib + l] | (v & 7) << 8, delta = -0.125 if v & 8 else 0.125; scale of rows
    2k, 2k+1 = d * (2 * ((sc[ib // 2] >> (6 (ib % 2) + 3k)) & 7) + 1).
    y = scale * (grid + delta)."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        sc = reinterpret(b.bytes("scales"), torch.int16).to(torch.int32) & 0xFFFF  # (n, 4)
        d_bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
        d = f16_bits_to_f32(d_bits).view(n, 1, 1)
        qh = b.field("qh")  # (n, 16)
        v = split_bits(qh, (0, 4), 4, dim=-1).view(n, 8, 4).to(torch.int32)  # (n, ib, l)
        rows = b.field("qs").view(n, 8, 4).to(torch.int32) | ((v & 7) << 8)
        delta = torch.where((v & 8) != 0, -tables.IQ1_DELTA, tables.IQ1_DELTA)  # (n, 8, 4)
        k3 = (sc.view(n, 4, 1) >> table(range(0, 12, 3), torch.int32, sc.device)) & 7  # (n, 4, 4)
        dl = scaled(2 * k3.view(n, 8, 2) + 1, d)  # (n, ib, k)
        y = grid(tables.IQ1S_GRID, rows).add_(delta.unsqueeze(-1))  # (n, 8, 4, 8)
        return y.view(n, 8, 2, 16).mul_(dl.unsqueeze(-1)).view(n, 256)


class IQ4_NL(QuantType, ggml_type=GGMLType.IQ4_NL):
    """32-value blocks: y[j] = d * kvalues_iq4nl[nibble], nibble order as Q4_0."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        qs = b.field("qs")  # (n, 16)
        kv = table(tables.KVALUES_IQ4NL, torch.float32, qs.device)
        q = split_bits(qs, (0, 4), 4, dim=1)  # (n, 2, 16)
        return lookup(kv, q).view(qs.shape[0], 32).mul_(b.field("d"))


class IQ4_XS(QuantType, ggml_type=GGMLType.IQ4_XS):
    """Eight 32-value sub-blocks: ls = nibble ib % 2 of scales_l[ib // 2] |
    ((scales_h >> 2ib) & 3) << 4; y = (d * (ls - 32)) * kvalues_iq4nl[nibble], each
    sub-block's 16 bytes giving 16 low nibbles, then 16 high nibbles."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        sl = b.field("scales_l")  # (n, 4)
        low = split_bits(sl, (0, 4), 4, dim=-1).view(n, 8).to(torch.int32)
        high = (b.field("scales_h") >> table(range(0, 16, 2), torch.int32, sl.device)) & 3  # (n, 8)
        dl = scaled((low | (high << 4)) - 32, b.field("d"))  # (n, 8)
        qs = b.field("qs").view(n, 8, 16)
        q = split_bits(qs, (0, 4), 4, dim=2).view(n, 8, 32)  # (n, ib, half, j)
        kv = table(tables.KVALUES_IQ4NL, torch.float32, qs.device)
        return lookup(kv, q).mul_(dl.unsqueeze(-1)).view(n, 256)
