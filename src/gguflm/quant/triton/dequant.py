"""Tile dequantization for prefill: field planes -> a half-precision copy of the weight
that a tensor-core matmul (cuBLAS through ``torch.matmul``) consumes.

    Y[r, k] = W[r, k]  (= q * scale + bias of its sub-block, per the type's decoder),
              rounded to float16 or bfloat16

One program writes ``BLOCK_N`` rows x ``BB`` blocks. The prefill path dequantizes one
weight at a time into a reused workspace, so no float copy of the model persists.
:func:`dequantize_reference` is the plain-torch twin (the exact torch dequantizer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gguflm.quant.triton.codecs import codebook, codec, unit
from gguflm.quant.triton.planes import PackedWeight


@triton.jit
def _dequant_kernel(W_ptr, T_ptr, IDS_ptr, Y_ptr, N, K, nb, n_blocks, y_row_stride,
                    DECODE: tl.constexpr, QK: tl.constexpr, UNIT: tl.constexpr, BB: tl.constexpr,
                    BLOCK_N: tl.constexpr, GATHER: tl.constexpr):
    """Y[r, b * QK + i] = value i of block b of W's row r (of row IDS[r] with GATHER),
    for this program's tile of BLOCK_N output rows x BB blocks; N output rows."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b0 = tl.program_id(1) * BB
    rows_in = tl.minimum(rows, N - 1)
    if GATHER:
        rows_in = tl.load(IDS_ptr + rows_in).to(tl.int32)
    f, scale, bias, kidx = DECODE(W_ptr, T_ptr, rows_in.to(tl.int64) * nb + b0, n_blocks, nb - b0, BB)
    if UNIT > 0:
        q = (f - 1.0) * UNIT                                                  # the code, exactly
    else:
        q = f                                                                 # a codebook value
    vals = q * scale + bias                                                   # [BN, A, B, C]
    k = b0 * QK + kidx                                                        # [A, B, C]
    ptrs = Y_ptr + rows.to(tl.int64)[:, None, None, None] * y_row_stride + k[None]
    mask = (rows < N)[:, None, None, None] & (k < K)[None]
    tl.store(ptrs, vals.to(Y_ptr.dtype.element_ty), mask=mask)


def dequantize_into(w: PackedWeight, out: torch.Tensor, rows: torch.Tensor | None = None,
                    block_n: int | None = None) -> torch.Tensor:
    """Write W (or its rows ``rows``, int32/int64 [n] on the device: an embedding lookup) into
    ``out``: [n_rows or n, n_cols] float32/float16/bfloat16, rows contiguous.
    Row ids are not checked here: the caller validates token ids. ``block_n``: rows per
    program (default 16, 64 on the CPU)."""
    c = codec(w.ggml_type)
    if c is None:
        raise ValueError(f"no dequantization kernel for {w.ggml_type.name}")
    n_out = w.n_rows if rows is None else rows.numel()
    if out.shape != (n_out, w.n_cols) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major [{n_out}, {w.n_cols}] tensor")
    nb = w.blocks_per_row
    bb = 1 << (min(nb, 1024 // c.block_size).bit_length() - 1)   # a power of two <= both
    if block_n is None:  # the interpreter (CPU) runs programs one by one: fewer, larger ones
        block_n = 64 if out.device.type == "cpu" else 16
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(nb, bb))
    _dequant_kernel[grid](w.planes, codebook(out.device), rows if rows is not None else out, out,
                          n_out, w.n_cols, nb, w.n_rows * nb, out.stride(0),
                          DECODE=c.fn, QK=c.block_size, UNIT=unit(c), BB=bb, BLOCK_N=block_n, GATHER=rows is not None,
                          num_warps=4)
    return out


def dequantize_reference(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """What :func:`dequantize_into` writes: the exact float32 values, rounded to ``dtype``."""
    from gguflm.quant import dequantize

    return dequantize(w.blocks().reshape(-1), w.ggml_type, (w.n_cols, w.n_rows)).to(dtype)
