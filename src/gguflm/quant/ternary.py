"""Ternary types (values -d, 0, +d), for BitNet-style models."""

from __future__ import annotations

import torch

from gguflm.gguf.types import GGMLType
from gguflm.quant.base import Blocks, QuantType, scaled, table
from gguflm.quant.kquants import two_bit_planes

_POW3 = (1, 3, 9, 27, 81, 243)


def trits(packed: torch.Tensor, n_trits: int) -> torch.Tensor:
    """(n, k) uint8 -> (n, n_trits, k) int16 in 0..2: trit t of byte x is
    ((x * 3**t mod 256) * 3) >> 8 (base-3 digits stored as a fixed-point fraction)."""
    p = table(_POW3[:n_trits], torch.uint8, packed.device).view(1, n_trits, 1)
    shifted = packed.unsqueeze(1) * p  # uint8 product wraps mod 256, as in C
    return (shifted.to(torch.int16) * 3) >> 8


class TQ1_0(QuantType, ggml_type=GGMLType.TQ1_0):
    """1.6875 bpw: y = (trit - 1) * d. Output order: the 5 trits of qs[0:32] (trit t of
    byte m -> 32t + m), then of qs[32:48] (160 + 16t + m), then 4 trits of qh[0:4]
    (240 + 4t + m)."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        n = b.n
        qs, qh = b.field("qs"), b.field("qh")  # (n, 48), (n, 4)
        t = torch.cat((trits(qs[:, :32], 5).view(n, 160), trits(qs[:, 32:], 5).view(n, 80),
                       trits(qh, 4).view(n, 16)), dim=1)  # (n, 256)
        return scaled(t.sub_(1), b.field("d"))


class TQ2_0(QuantType, ggml_type=GGMLType.TQ2_0):
    """2 bpw: y = (q - 1) * d, q the 2-bit fields in K-quant plane order
    (:func:`gguflm.quant.kquants.two_bit_planes`); q = 3 gives 2d."""

    @staticmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        q = two_bit_planes(b.field("qs")).view(torch.int8).sub_(1)  # (n, 256)
        return scaled(q, b.field("d"))
