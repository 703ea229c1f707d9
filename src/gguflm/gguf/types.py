"""GGML tensor types and their block layouts: the one table the reader, the
dequantizers and the kernels all read.

A layout is a list of named fields, in byte order, as ggml's ``block_*`` structs
declare them (ggml-common.h). ``type_size`` is derived from the fields, so a
wrong field is caught by the ``_EXPECTED_SIZES`` check at import time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    Q2_0 = 42


QK_K = 256
K_SCALE_SIZE = 12


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str  # numpy dtype string, little-endian
    count: int

    @property
    def nbytes(self) -> int:
        return np.dtype(self.dtype).itemsize * self.count


@dataclass(frozen=True)
class Layout:
    """One block: ``block_size`` elements stored in ``fields`` (byte order)."""

    block_size: int
    fields: tuple[Field, ...]

    @property
    def type_size(self) -> int:
        return sum(f.nbytes for f in self.fields)

    @property
    def offsets(self) -> dict[str, int]:
        out, off = {}, 0
        for f in self.fields:
            out[f.name] = off
            off += f.nbytes
        return out

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def _L(block_size: int, *fields: tuple[str, str, int]) -> Layout:
    return Layout(block_size, tuple(Field(*f) for f in fields))


H, U8, I8_, U16, I16_, F32_ = "<f2", "u1", "i1", "<u2", "<i2", "<f4"

LAYOUTS: dict[GGMLType, Layout] = {
    GGMLType.F32: _L(1, ("v", "<f4", 1)),
    GGMLType.F16: _L(1, ("v", "<f2", 1)),
    GGMLType.BF16: _L(1, ("v", "<u2", 1)),
    GGMLType.F64: _L(1, ("v", "<f8", 1)),
    GGMLType.I8: _L(1, ("v", "i1", 1)),
    GGMLType.I16: _L(1, ("v", "<i2", 1)),
    GGMLType.I32: _L(1, ("v", "<i4", 1)),
    GGMLType.I64: _L(1, ("v", "<i8", 1)),
    GGMLType.Q1_0: _L(128, ("d", H, 1), ("qs", U8, 128 // 8)),
    GGMLType.Q2_0: _L(64, ("d", H, 1), ("qs", U8, 64 // 4)),
    GGMLType.Q4_0: _L(32, ("d", H, 1), ("qs", U8, 16)),
    GGMLType.Q4_1: _L(32, ("d", H, 1), ("m", H, 1), ("qs", U8, 16)),
    GGMLType.Q5_0: _L(32, ("d", H, 1), ("qh", U8, 4), ("qs", U8, 16)),
    GGMLType.Q5_1: _L(32, ("d", H, 1), ("m", H, 1), ("qh", U8, 4), ("qs", U8, 16)),
    GGMLType.Q8_0: _L(32, ("d", H, 1), ("qs", I8_, 32)),
    GGMLType.Q8_1: _L(32, ("d", H, 1), ("s", H, 1), ("qs", I8_, 32)),
    GGMLType.MXFP4: _L(32, ("e", U8, 1), ("qs", U8, 16)),
    GGMLType.NVFP4: _L(64, ("d", U8, 4), ("qs", U8, 32)),
    GGMLType.TQ1_0: _L(QK_K, ("qs", U8, (QK_K - 4 * QK_K // 64) // 5), ("qh", U8, QK_K // 64), ("d", H, 1)),
    GGMLType.TQ2_0: _L(QK_K, ("qs", U8, QK_K // 4), ("d", H, 1)),
    GGMLType.Q2_K: _L(QK_K, ("scales", U8, QK_K // 16), ("qs", U8, QK_K // 4), ("d", H, 1), ("dmin", H, 1)),
    GGMLType.Q3_K: _L(QK_K, ("hmask", U8, QK_K // 8), ("qs", U8, QK_K // 4), ("scales", U8, 12), ("d", H, 1)),
    GGMLType.Q4_K: _L(QK_K, ("d", H, 1), ("dmin", H, 1), ("scales", U8, K_SCALE_SIZE), ("qs", U8, QK_K // 2)),
    GGMLType.Q5_K: _L(QK_K, ("d", H, 1), ("dmin", H, 1), ("scales", U8, K_SCALE_SIZE),
                      ("qh", U8, QK_K // 8), ("qs", U8, QK_K // 2)),
    GGMLType.Q6_K: _L(QK_K, ("ql", U8, QK_K // 2), ("qh", U8, QK_K // 4), ("scales", I8_, QK_K // 16), ("d", H, 1)),
    GGMLType.Q8_K: _L(QK_K, ("d", F32_, 1), ("qs", I8_, QK_K), ("bsums", I16_, QK_K // 16)),
    GGMLType.IQ2_XXS: _L(QK_K, ("d", H, 1), ("qs", U16, QK_K // 8)),
    GGMLType.IQ2_XS: _L(QK_K, ("d", H, 1), ("qs", U16, QK_K // 8), ("scales", U8, QK_K // 32)),
    GGMLType.IQ2_S: _L(QK_K, ("d", H, 1), ("qs", U8, QK_K // 4), ("qh", U8, QK_K // 32), ("scales", U8, QK_K // 32)),
    GGMLType.IQ3_XXS: _L(QK_K, ("d", H, 1), ("qs", U8, 3 * QK_K // 8)),
    GGMLType.IQ3_S: _L(QK_K, ("d", H, 1), ("qs", U8, QK_K // 4), ("qh", U8, QK_K // 32),
                       ("signs", U8, QK_K // 8), ("scales", U8, QK_K // 64)),
    GGMLType.IQ1_S: _L(QK_K, ("d", H, 1), ("qs", U8, QK_K // 8), ("qh", U16, QK_K // 32)),
    GGMLType.IQ1_M: _L(QK_K, ("qs", U8, QK_K // 8), ("qh", U8, QK_K // 16), ("scales", U8, QK_K // 32)),
    GGMLType.IQ4_NL: _L(32, ("d", H, 1), ("qs", U8, 16)),
    GGMLType.IQ4_XS: _L(QK_K, ("d", H, 1), ("scales_h", U16, 1), ("scales_l", U8, QK_K // 64), ("qs", U8, QK_K // 2)),
}

# (block_size, type_size) as ggml's type traits declare them; checked against LAYOUTS.
_EXPECTED_SIZES = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q1_0: (128, 18), GGMLType.Q2_0: (64, 18),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 36), GGMLType.MXFP4: (32, 17), GGMLType.NVFP4: (64, 36),
    GGMLType.TQ1_0: (256, 54), GGMLType.TQ2_0: (256, 66),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74), GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ3_XXS: (256, 98), GGMLType.IQ3_S: (256, 110), GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ1_M: (256, 56), GGMLType.IQ4_NL: (32, 18), GGMLType.IQ4_XS: (256, 136),
}
for _t, (_bs, _ts) in _EXPECTED_SIZES.items():
    _lay = LAYOUTS[_t]
    if (_lay.block_size, _lay.type_size) != (_bs, _ts):  # pragma: no cover - import-time invariant
        raise AssertionError(f"layout of {_t.name}: {(_lay.block_size, _lay.type_size)} != {(_bs, _ts)}")


def layout(ggml_type: int) -> Layout:
    """The layout of a type id; unknown ids raise a GGUFError naming the id."""
    from gguflm.errors import GGUFError

    try:
        return LAYOUTS[GGMLType(ggml_type)]
    except ValueError:
        raise GGUFError(f"unknown ggml type id {ggml_type}") from None
