"""Per-type block decoders for the Triton kernels: one registered ``@triton.jit`` function
per GGML type, reading the field planes of :mod:`gguflm.quant.triton.planes`.

Every decoder has the same signature and contract::

    f, scale, bias, kidx = decode(W_ptr, T_ptr, blk0, n_blocks, n_left, BB)

    W_ptr     uint8 field planes of the whole tensor (n_blocks blocks)
    T_ptr     float32 codebook (kvalues_iq4nl) for the IQ4 types, unused otherwise
    blk0      [BN] int64: index of the first block of this chunk in each of BN rows
    n_left    blocks left in the row from blk0 (block indices are clamped below it, so
              every load stays inside the row; the caller masks the surplus by kidx)
    BB        constexpr: blocks per chunk
    f         [BN, A, B, C] float32: each code q as ``1 + q / 2^bits`` (exact; see
              :func:`_unit`), or for a codebook type (bits = 0) the codebook value q
    scale     [BN, A, B, 1] float32 and bias (same shape, or the scalar 0.0): the value
              is ``q * scale + bias``; both are constant along C (one sub-block)
    kidx      [A, B, C] int32: the position of each value within the chunk's
              BB * block_size elements (natural ggml order)

Values come in *storage order*: C runs over consecutive bytes of a quant field (so the
loads are wide and contiguous), B over the nibble / bit-pair a byte contributes, and A
over blocks and sub-blocks; ``kidx`` says where each lands. A GEMV gathers the
activations at ``kidx`` (a dot product does not care about order) and reduces
``f * x`` along C before scaling (``sum q x = 2^bits (sum f x - sum x)``), so a value
costs a shift, a logic op and a multiply-add; dequantization recovers
``q = (f - 1) 2^bits`` exactly and stores ``q * scale + bias`` at ``kidx``. The formula each decoder implements is the one
of ggml-quants.c ``dequantize_row_*``, given in its docstring (``y = ...``); ``scale`` and
``bias`` are its per-sub-block factors (``bias = -8 d`` for Q4_0's ``d * (q - 8)``).
The field offsets come from the one layout table, ``LAYOUTS``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gguflm.gguf.types import LAYOUTS, GGMLType
from gguflm.quant.tables import KVALUES_IQ4NL


def _off(t: GGMLType, field: str) -> tl.constexpr:
    """Start of ``field`` within a block of ``t``: its plane starts at n_blocks * this."""
    return tl.constexpr(LAYOUTS[t].offsets[field])


def _size(t: GGMLType, field: str) -> tl.constexpr:
    """Bytes of ``field`` per block: the stride between blocks inside its plane."""
    return tl.constexpr(LAYOUTS[t].field(field).nbytes)


@dataclass(frozen=True)
class Codec:
    """A registered decoder: ``fn`` for ``ggml_type``, ``block_size`` values per block;
    its codes have ``bits`` bits (0: codebook values, read through ``T_ptr``)."""

    ggml_type: GGMLType
    fn: triton.JITFunction
    block_size: int
    bits: int


CODECS: dict[GGMLType, Codec] = {}


def _register(ggml_type: GGMLType, bits: int):
    def deco(fn: triton.JITFunction) -> triton.JITFunction:
        if ggml_type in CODECS:
            raise TypeError(f"{ggml_type.name} decoder registered twice")
        CODECS[ggml_type] = Codec(ggml_type, fn, LAYOUTS[ggml_type].block_size, bits)
        return fn
    return deco


@functools.cache
def codebook(device: torch.device) -> torch.Tensor:
    """kvalues_iq4nl as float32 on ``device``: the ``T_ptr`` every decoder receives."""
    return torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=device)


def unit(c: Codec) -> float:
    """The kernels' UNIT constexpr: 2^bits, or 0.0 for codebook values."""
    return float(1 << c.bits) if c.bits else 0.0


def codec(ggml_type: int) -> Codec | None:
    """The decoder of a type, or None when the Triton kernels do not cover it."""
    try:
        return CODECS.get(GGMLType(ggml_type))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------
# Shared helpers. Index tensors are 3-D [A, B, C]; ``x[None]`` lifts them to the
# [BN, A, B, C] of the loads.
# ---------------------------------------------------------------------------------------

@triton.jit
def _u8(W_ptr, n_blocks, OFF: tl.constexpr, SIZE: tl.constexpr, blk, byte):
    """Byte ``byte`` of field (OFF, SIZE) of block ``blk`` (broadcast shapes), as int32."""
    return tl.load(W_ptr + n_blocks * OFF + blk * SIZE + byte).to(tl.int32)


@triton.jit
def _f16(W_ptr, n_blocks, OFF: tl.constexpr, blk):
    """The F16 field at OFF of block ``blk``, widened to float32."""
    base = (W_ptr + n_blocks * OFF).to(tl.pointer_type(tl.float16))
    return tl.load(base + blk).to(tl.float32)


@triton.jit
def _unit(q, BITS: tl.constexpr):
    """The code 0 <= q < 2^BITS as the float32 1 + q / 2^BITS: q placed at the top of a
    mantissa under exponent 0 (one shift and one OR, no int-to-float conversion)."""
    return ((q << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _blocks(blk0, n_left, A: tl.constexpr, PER_BLOCK: tl.constexpr):
    """A-row a belongs to chunk block a // PER_BLOCK. Returns that block's index for each
    row, [BN, A, 1, 1], clamped inside the row, and the unclamped chunk block, [A, 1, 1]."""
    ib = tl.arange(0, A) // PER_BLOCK
    clamped = tl.minimum(ib, n_left - 1)
    return blk0[:, None, None, None] + clamped[None, :, None, None], ib[:, None, None]


@triton.jit
def _grid(A: tl.constexpr, B: tl.constexpr, C: tl.constexpr):
    """The three index vectors of an [A, B, C] grid, each shaped to broadcast over it."""
    return tl.arange(0, A)[:, None, None], tl.arange(0, B)[None, :, None], tl.arange(0, C)[None, None, :]


# ---------------------------------------------------------------------------------------
# Legacy 32-value blocks: [BN, BB (block), B, C]
# ---------------------------------------------------------------------------------------

Q4_0_D, Q4_0_QS, Q4_0_QSZ = _off(GGMLType.Q4_0, "d"), _off(GGMLType.Q4_0, "qs"), _size(GGMLType.Q4_0, "qs")


@_register(GGMLType.Q4_0, bits=4)
@triton.jit
def _q4_0(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """y[j] = d * ((qs[j] & 15) - 8), y[j + 16] = d * ((qs[j] >> 4) - 8), j < 16.
    B = nibble p, C = byte l: element 16p + l."""
    blk, ib = _blocks(blk0, n_left, BB, 1)
    a, p, c = _grid(BB, 2, 16)
    q = (_u8(W_ptr, n_blocks, Q4_0_QS, Q4_0_QSZ, blk, c[None]) >> (4 * p[None])) & 15
    d = _f16(W_ptr, n_blocks, Q4_0_D, blk)
    return _unit(q, 4), d, -8.0 * d, ib * 32 + p * 16 + c


Q4_1_D, Q4_1_M = _off(GGMLType.Q4_1, "d"), _off(GGMLType.Q4_1, "m")
Q4_1_QS, Q4_1_QSZ = _off(GGMLType.Q4_1, "qs"), _size(GGMLType.Q4_1, "qs")


@_register(GGMLType.Q4_1, bits=4)
@triton.jit
def _q4_1(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """y[j] = (qs[j] & 15) * d + m, y[j + 16] = (qs[j] >> 4) * d + m."""
    blk, ib = _blocks(blk0, n_left, BB, 1)
    a, p, c = _grid(BB, 2, 16)
    q = (_u8(W_ptr, n_blocks, Q4_1_QS, Q4_1_QSZ, blk, c[None]) >> (4 * p[None])) & 15
    return _unit(q, 4), _f16(W_ptr, n_blocks, Q4_1_D, blk), _f16(W_ptr, n_blocks, Q4_1_M, blk), \
        ib * 32 + p * 16 + c


@triton.jit
def _q5_quants(W_ptr, n_blocks, blk, QH: tl.constexpr, QHSZ: tl.constexpr, QS: tl.constexpr, QSZ: tl.constexpr):
    """The 5-bit values of a Q5_0/Q5_1 block: the nibble of element k = 16p + l, plus bit k
    of the little-endian 32-bit qh as bit 4. [BN, BB, 2, 16] int32."""
    a, p, c = _grid(1, 2, 16)
    nib = (_u8(W_ptr, n_blocks, QS, QSZ, blk, c[None]) >> (4 * p[None])) & 15
    k = (16 * p + c)[None]
    high = (_u8(W_ptr, n_blocks, QH, QHSZ, blk, k // 8) >> (k % 8)) & 1
    return nib | (high << 4)


Q5_0_D, Q5_0_QH, Q5_0_QS = _off(GGMLType.Q5_0, "d"), _off(GGMLType.Q5_0, "qh"), _off(GGMLType.Q5_0, "qs")
Q5_0_QHSZ, Q5_0_QSZ = _size(GGMLType.Q5_0, "qh"), _size(GGMLType.Q5_0, "qs")


@_register(GGMLType.Q5_0, bits=5)
@triton.jit
def _q5_0(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """y[k] = d * (q5[k] - 16), q5 as in :func:`_q5_quants`."""
    blk, ib = _blocks(blk0, n_left, BB, 1)
    a, p, c = _grid(BB, 2, 16)
    q = _q5_quants(W_ptr, n_blocks, blk, Q5_0_QH, Q5_0_QHSZ, Q5_0_QS, Q5_0_QSZ)
    d = _f16(W_ptr, n_blocks, Q5_0_D, blk)
    return _unit(q, 5), d, -16.0 * d, ib * 32 + p * 16 + c


Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS = (_off(GGMLType.Q5_1, "d"), _off(GGMLType.Q5_1, "m"),
                                    _off(GGMLType.Q5_1, "qh"), _off(GGMLType.Q5_1, "qs"))
Q5_1_QHSZ, Q5_1_QSZ = _size(GGMLType.Q5_1, "qh"), _size(GGMLType.Q5_1, "qs")


@_register(GGMLType.Q5_1, bits=5)
@triton.jit
def _q5_1(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """y[k] = q5[k] * d + m."""
    blk, ib = _blocks(blk0, n_left, BB, 1)
    a, p, c = _grid(BB, 2, 16)
    q = _q5_quants(W_ptr, n_blocks, blk, Q5_1_QH, Q5_1_QHSZ, Q5_1_QS, Q5_1_QSZ)
    return _unit(q, 5), _f16(W_ptr, n_blocks, Q5_1_D, blk), _f16(W_ptr, n_blocks, Q5_1_M, blk), \
        ib * 32 + p * 16 + c


Q8_0_D, Q8_0_QS, Q8_0_QSZ = _off(GGMLType.Q8_0, "d"), _off(GGMLType.Q8_0, "qs"), _size(GGMLType.Q8_0, "qs")


@_register(GGMLType.Q8_0, bits=8)
@triton.jit
def _q8_0(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """y[j] = d * qs[j] (int8) = d * u - 128 d with the code u = qs[j] + 128. B = 1, C = byte j."""
    blk, ib = _blocks(blk0, n_left, BB, 1)
    a, p, c = _grid(BB, 1, 32)
    u = _u8(W_ptr, n_blocks, Q8_0_QS, Q8_0_QSZ, blk, c[None]) ^ 0x80          # q + 128
    d = _f16(W_ptr, n_blocks, Q8_0_D, blk)
    return _unit(u, 8), d, -128.0 * d, ib * 32 + p + c


IQ4_NL_D, IQ4_NL_QS, IQ4_NL_QSZ = (_off(GGMLType.IQ4_NL, "d"), _off(GGMLType.IQ4_NL, "qs"),
                                   _size(GGMLType.IQ4_NL, "qs"))


@_register(GGMLType.IQ4_NL, bits=0)
@triton.jit
def _iq4_nl(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """y[j] = d * kvalues[qs[j] & 15], y[j + 16] = d * kvalues[qs[j] >> 4]."""
    blk, ib = _blocks(blk0, n_left, BB, 1)
    a, p, c = _grid(BB, 2, 16)
    q = (_u8(W_ptr, n_blocks, IQ4_NL_QS, IQ4_NL_QSZ, blk, c[None]) >> (4 * p[None])) & 15
    return tl.load(T_ptr + q), _f16(W_ptr, n_blocks, IQ4_NL_D, blk), 0.0, ib * 32 + p * 16 + c


# ---------------------------------------------------------------------------------------
# K-quants: 256-value super-blocks; A runs over (block, sub-block group)
# ---------------------------------------------------------------------------------------

Q2_K_SC, Q2_K_QS, Q2_K_D, Q2_K_DMIN = (_off(GGMLType.Q2_K, "scales"), _off(GGMLType.Q2_K, "qs"),
                                       _off(GGMLType.Q2_K, "d"), _off(GGMLType.Q2_K, "dmin"))
Q2_K_SCSZ, Q2_K_QSZ = _size(GGMLType.Q2_K, "scales"), _size(GGMLType.Q2_K, "qs")


@_register(GGMLType.Q2_K, bits=2)
@triton.jit
def _q2_k(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """Element 128n + 32j + 16h + l (n, h < 2, j < 4, l < 16), sub-block s = 8n + 2j + h:
    y = (d * (sc & 15)) * ((qs[32n + 16h + l] >> 2j) & 3) - dmin * (sc >> 4), sc = scales[s].
    A = 4 * block + 2n + h, B = j, C = l."""
    blk, ib = _blocks(blk0, n_left, 4 * BB, 4)
    a, j, c = _grid(4 * BB, 4, 16)
    n, h = (a // 2) % 2, a % 2
    q = (_u8(W_ptr, n_blocks, Q2_K_QS, Q2_K_QSZ, blk, (32 * n + 16 * h + c)[None]) >> (2 * j[None])) & 3
    sc = _u8(W_ptr, n_blocks, Q2_K_SC, Q2_K_SCSZ, blk, (8 * n + 2 * j + h)[None])      # [BN, A, 4, 1]
    dl = _f16(W_ptr, n_blocks, Q2_K_D, blk) * (sc & 15).to(tl.float32)
    ml = _f16(W_ptr, n_blocks, Q2_K_DMIN, blk) * (sc >> 4).to(tl.float32)
    return _unit(q, 2), dl, -ml, ib * 256 + 128 * n + 32 * j + 16 * h + c


Q3_K_HM, Q3_K_QS, Q3_K_SC, Q3_K_D = (_off(GGMLType.Q3_K, "hmask"), _off(GGMLType.Q3_K, "qs"),
                                     _off(GGMLType.Q3_K, "scales"), _off(GGMLType.Q3_K, "d"))
Q3_K_HMSZ, Q3_K_QSZ, Q3_K_SCSZ = (_size(GGMLType.Q3_K, "hmask"), _size(GGMLType.Q3_K, "qs"),
                                  _size(GGMLType.Q3_K, "scales"))


@_register(GGMLType.Q3_K, bits=3)
@triton.jit
def _q3_k(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """Grid as Q2_K. q = ((qs[32n + 16h + l] >> 2j) & 3) - 4 + 4 * bit (4n + j) of
    hmask[16h + l]; scale of sub-block s: low 4 bits (scales[s % 8] >> 4 (s // 8)) & 15,
    high 2 bits (scales[8 + s % 4] >> 2 (s // 4)) & 3, minus 32; y = (d * scale) * q."""
    blk, ib = _blocks(blk0, n_left, 4 * BB, 4)
    a, j, c = _grid(4 * BB, 4, 16)
    n, h = (a // 2) % 2, a % 2
    lo2 = (_u8(W_ptr, n_blocks, Q3_K_QS, Q3_K_QSZ, blk, (32 * n + 16 * h + c)[None]) >> (2 * j[None])) & 3
    hbit = (_u8(W_ptr, n_blocks, Q3_K_HM, Q3_K_HMSZ, blk, (16 * h + c)[None]) >> (4 * n + j)[None]) & 1
    s = (8 * n + 2 * j + h)[None]                                                     # [1, A, 4, 1]
    low = (_u8(W_ptr, n_blocks, Q3_K_SC, Q3_K_SCSZ, blk, s % 8) >> (4 * (s // 8))) & 15
    high = (_u8(W_ptr, n_blocks, Q3_K_SC, Q3_K_SCSZ, blk, 8 + s % 4) >> (2 * (s // 4))) & 3
    dl = _f16(W_ptr, n_blocks, Q3_K_D, blk) * ((low | (high << 4)) - 32).to(tl.float32)
    return _unit(lo2 + 4 * hbit, 3), dl, -4.0 * dl, ib * 256 + 128 * n + 32 * j + 16 * h + c


@triton.jit
def _scale_min_k4(W_ptr, n_blocks, SC: tl.constexpr, SCSZ: tl.constexpr, blk, s):
    """Q4_K/Q5_K's packed 6-bit scale and min of sub-block s (0..7):
    s < 4: b[s] & 63, b[s + 4] & 63; else (b[s + 4] & 15) | (b[s - 4] >> 6) << 4,
    (b[s + 4] >> 4) | (b[s] >> 6) << 4."""
    b_s = _u8(W_ptr, n_blocks, SC, SCSZ, blk, s)
    b_s4 = _u8(W_ptr, n_blocks, SC, SCSZ, blk, s + 4)
    b_m4 = _u8(W_ptr, n_blocks, SC, SCSZ, blk, tl.maximum(s - 4, 0))
    sc = tl.where(s < 4, b_s & 63, (b_s4 & 15) | ((b_m4 >> 6) << 4))
    mn = tl.where(s < 4, b_s4 & 63, (b_s4 >> 4) | ((b_s >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


Q4_K_D, Q4_K_DMIN, Q4_K_SC, Q4_K_QS = (_off(GGMLType.Q4_K, "d"), _off(GGMLType.Q4_K, "dmin"),
                                       _off(GGMLType.Q4_K, "scales"), _off(GGMLType.Q4_K, "qs"))
Q4_K_SCSZ, Q4_K_QSZ = _size(GGMLType.Q4_K, "scales"), _size(GGMLType.Q4_K, "qs")


@_register(GGMLType.Q4_K, bits=4)
@triton.jit
def _q4_k(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """Element 64j + 32p + 16h + l (j < 4; p, h < 2; l < 16), sub-block s = 2j + p:
    y = (d * sc[s]) * ((qs[32j + 16h + l] >> 4p) & 15) - dmin * mn[s] (:func:`_scale_min_k4`).
    A = 8 * block + 2j + h, B = p, C = l."""
    blk, ib = _blocks(blk0, n_left, 8 * BB, 8)
    a, p, c = _grid(8 * BB, 2, 16)
    j, h = (a // 2) % 4, a % 2
    q = (_u8(W_ptr, n_blocks, Q4_K_QS, Q4_K_QSZ, blk, (32 * j + 16 * h + c)[None]) >> (4 * p[None])) & 15
    sc, mn = _scale_min_k4(W_ptr, n_blocks, Q4_K_SC, Q4_K_SCSZ, blk, (2 * j + p)[None])
    return _unit(q, 4), _f16(W_ptr, n_blocks, Q4_K_D, blk) * sc, -(_f16(W_ptr, n_blocks, Q4_K_DMIN, blk) * mn), \
        ib * 256 + 64 * j + 32 * p + 16 * h + c


Q5_K_D, Q5_K_DMIN, Q5_K_SC, Q5_K_QH, Q5_K_QS = (
    _off(GGMLType.Q5_K, "d"), _off(GGMLType.Q5_K, "dmin"), _off(GGMLType.Q5_K, "scales"),
    _off(GGMLType.Q5_K, "qh"), _off(GGMLType.Q5_K, "qs"))
Q5_K_SCSZ, Q5_K_QHSZ, Q5_K_QSZ = (_size(GGMLType.Q5_K, "scales"), _size(GGMLType.Q5_K, "qh"),
                                  _size(GGMLType.Q5_K, "qs"))


@_register(GGMLType.Q5_K, bits=5)
@triton.jit
def _q5_k(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """As Q4_K with a fifth bit: q = ((qs[32j + l] >> 4p) & 15) + 16 * ((qh[l] >> (2j + p)) & 1)."""
    blk, ib = _blocks(blk0, n_left, 4 * BB, 4)
    a, p, c = _grid(4 * BB, 2, 32)
    j = a % 4
    nib = (_u8(W_ptr, n_blocks, Q5_K_QS, Q5_K_QSZ, blk, (32 * j + c)[None]) >> (4 * p[None])) & 15
    high = (_u8(W_ptr, n_blocks, Q5_K_QH, Q5_K_QHSZ, blk, c[None]) >> (2 * j + p)[None]) & 1
    q = nib + 16 * high
    sc, mn = _scale_min_k4(W_ptr, n_blocks, Q5_K_SC, Q5_K_SCSZ, blk, (2 * j + p)[None])
    return _unit(q, 5), _f16(W_ptr, n_blocks, Q5_K_D, blk) * sc, -(_f16(W_ptr, n_blocks, Q5_K_DMIN, blk) * mn), \
        ib * 256 + 64 * j + 32 * p + c


Q6_K_QL, Q6_K_QH, Q6_K_SC, Q6_K_D = (_off(GGMLType.Q6_K, "ql"), _off(GGMLType.Q6_K, "qh"),
                                     _off(GGMLType.Q6_K, "scales"), _off(GGMLType.Q6_K, "d"))
Q6_K_QLSZ, Q6_K_QHSZ, Q6_K_SCSZ = (_size(GGMLType.Q6_K, "ql"), _size(GGMLType.Q6_K, "qh"),
                                   _size(GGMLType.Q6_K, "scales"))


@_register(GGMLType.Q6_K, bits=6)
@triton.jit
def _q6_k(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """Element 128n + 32j + 16h + l (j = jj + 2t < 4; n, jj, h, t < 2; l < 16), sub-block
    s = 8n + 2j + h: q = ((ql[64n + 32jj + 16h + l] >> 4t) & 15) | ((qh[32n + 16h + l] >> 2j) & 3) << 4,
    y = (d * scales[s]) * (q - 32), int8 scales. A = 8 * block + 4n + 2jj + h, B = t, C = l."""
    blk, ib = _blocks(blk0, n_left, 8 * BB, 8)
    a, t, c = _grid(8 * BB, 2, 16)
    n, jj, h = (a // 4) % 2, (a // 2) % 2, a % 2
    j = jj + 2 * t
    lo = (_u8(W_ptr, n_blocks, Q6_K_QL, Q6_K_QLSZ, blk, (64 * n + 32 * jj + 16 * h + c)[None]) >> (4 * t[None])) & 15
    hi = (_u8(W_ptr, n_blocks, Q6_K_QH, Q6_K_QHSZ, blk, (32 * n + 16 * h + c)[None]) >> (2 * j)[None]) & 3
    scales = (W_ptr + n_blocks * Q6_K_SC).to(tl.pointer_type(tl.int8))
    sc = tl.load(scales + blk * Q6_K_SCSZ + (8 * n + 2 * j + h)[None]).to(tl.float32)  # [BN, A, 2, 1]
    dl = _f16(W_ptr, n_blocks, Q6_K_D, blk) * sc
    return _unit(lo | (hi << 4), 6), dl, -32.0 * dl, ib * 256 + 128 * n + 32 * j + 16 * h + c


IQ4_XS_D, IQ4_XS_SH, IQ4_XS_SL, IQ4_XS_QS = (
    _off(GGMLType.IQ4_XS, "d"), _off(GGMLType.IQ4_XS, "scales_h"), _off(GGMLType.IQ4_XS, "scales_l"),
    _off(GGMLType.IQ4_XS, "qs"))
IQ4_XS_SHSZ, IQ4_XS_SLSZ, IQ4_XS_QSZ = (_size(GGMLType.IQ4_XS, "scales_h"), _size(GGMLType.IQ4_XS, "scales_l"),
                                        _size(GGMLType.IQ4_XS, "qs"))


@_register(GGMLType.IQ4_XS, bits=0)
@triton.jit
def _iq4_xs(W_ptr, T_ptr, blk0, n_blocks, n_left, BB: tl.constexpr):
    """Sub-block ib < 8 of 32 values: ls = ((scales_l[ib // 2] >> 4 (ib % 2)) & 15) |
    ((scales_h >> 2ib) & 3) << 4 (scales_h little-endian 16-bit); element 32ib + 16p + l:
    y = (d * (ls - 32)) * kvalues[(qs[16ib + l] >> 4p) & 15]. A = 8 * block + ib, B = p, C = l."""
    blk, ib = _blocks(blk0, n_left, 8 * BB, 8)
    a, p, c = _grid(8 * BB, 2, 16)
    sub = a % 8
    q = (_u8(W_ptr, n_blocks, IQ4_XS_QS, IQ4_XS_QSZ, blk, (16 * sub + c)[None]) >> (4 * p[None])) & 15
    sl = (_u8(W_ptr, n_blocks, IQ4_XS_SL, IQ4_XS_SLSZ, blk, (sub // 2)[None]) >> (4 * (sub % 2))[None]) & 15
    sh = (_u8(W_ptr, n_blocks, IQ4_XS_SH, IQ4_XS_SHSZ, blk, (sub // 4)[None]) >> (2 * (sub % 4))[None]) & 3
    dl = _f16(W_ptr, n_blocks, IQ4_XS_D, blk) * ((sl | (sh << 4)) - 32).to(tl.float32)
    return tl.load(T_ptr + q), dl, 0.0, ib * 256 + 32 * sub + 16 * p + c
