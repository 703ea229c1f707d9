"""Fused dequantize x GEMV for decode, straight from the field planes, for one activation
row or for each of R rows:

    y[i, r] = sum_k W[r, k] * x'[i, k]                         (_gemv_kernel)
    y[i, r] = silu(Wg[r] . x'[i]) * (Wu[r] . x'[i])             (_gemv_swiglu_kernel)

with ``x' = x`` or, with ``NORM``, the RMS-normalised ``x' = (x * rstd) * norm_w``,
``rstd = 1 / sqrt(mean(x^2) + eps)`` (ggml_rms_norm then ggml_mul), computed by every
program from the whole row ``x[i]``; with ``RESIDUAL``, ``y[i, r] = R[i, r] + W[r] . x'[i]``
(``R`` may be ``y`` itself). ``W`` is dequantized block by block in registers (the type's
decoder from :mod:`gguflm.quant.triton.codecs`) and never written out; products and sums
are float32. One program owns ``BLOCK_N`` weight rows, walks their blocks ``BB`` at a
time, and does so for ``XR`` activation rows one after the other (the tile, read once
from memory, is then in cache for the next rows); every activation row runs the same
code on the same shapes, so row i's bits are those of the one-row call on ``x[i]``,
whatever R and however the rows are grouped (the server's decode rows: a row computes
the same alone or among others). The row count is not a specialised argument: one
compiled kernel for every R.

:func:`gemv_reference` is the plain-torch twin: dequantize, then matmul in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gguflm.quant.triton.codecs import codebook, codec, unit
from gguflm.quant.triton.planes import PackedWeight


@triton.jit
def _rstd(X_ptr, K, eps, RB: tl.constexpr):
    """1 / sqrt(mean(x[:K]^2) + eps), float32."""
    acc = tl.zeros([RB], dtype=tl.float32)
    for k0 in range(0, K, RB):
        k = k0 + tl.arange(0, RB)
        x = tl.load(X_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        acc += x * x
    return 1.0 / tl.sqrt(tl.sum(acc, axis=0) / K + eps)


@triton.jit
def _activations(X_ptr, NW_ptr, k, K, NORM: tl.constexpr, EVEN: tl.constexpr):
    """x[k] (times norm_w[k] with NORM) for an index tensor k; 0 past K unless EVEN.
    The RMS factor rstd is common to all k and applied once, to the finished dot."""
    if EVEN:
        x = tl.load(X_ptr + k).to(tl.float32)
    else:
        x = tl.load(X_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    if NORM:
        if EVEN:
            w = tl.load(NW_ptr + k).to(tl.float32)
        else:
            w = tl.load(NW_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        x = x * w
    return x


@triton.jit
def _chunk_dots(W_ptr, T_ptr, X_ptr, NW_ptr, blk0, b0, nb, n_blocks, K,
                DECODE: tl.constexpr, QK: tl.constexpr, UNIT: tl.constexpr, BB: tl.constexpr,
                NORM: tl.constexpr, EVEN: tl.constexpr):
    """Partial dot products of blocks b0 .. b0+BB-1 of each row, one per sub-block,
    [BLOCK_N, A, B, 1] float32: with S = sum_C f x and X = sum_C x, the codes' sum
    sum_C q x is UNIT (S - X) (f = 1 + q / UNIT), or S for codebook values (UNIT = 0);
    the sub-block contributes scale * sum_C q x + bias * X."""
    f, scale, bias, kidx = DECODE(W_ptr, T_ptr, blk0 + b0, n_blocks, nb - b0, BB)
    x = _activations(X_ptr, NW_ptr, b0 * QK + kidx, K, NORM, EVEN)        # [A, B, C]
    s = tl.sum(f * x[None], axis=3, keep_dims=True)                        # [BN, A, B, 1]
    xs = tl.sum(x, axis=2, keep_dims=True)[None]                           # [1, A, B, 1]
    if UNIT > 0:
        return (s - xs) * (scale * UNIT) + bias * xs
    else:
        return s * scale + bias * xs


@triton.jit
def _row_dots(W_ptr, T_ptr, X_ptr, NW_ptr, rows, K, nb, n_blocks,
              DECODE: tl.constexpr, QK: tl.constexpr, UNIT: tl.constexpr, BB: tl.constexpr,
              NORM: tl.constexpr, EVEN: tl.constexpr):
    """[BLOCK_N] float32 dot products of rows ``rows`` of W with x (times norm_w).
    Per-sub-block partials accumulate across chunks and are reduced once at the end;
    past the row's end x is 0, so clamped (repeated) blocks add nothing."""
    blk0 = rows.to(tl.int64) * nb
    acc = _chunk_dots(W_ptr, T_ptr, X_ptr, NW_ptr, blk0, 0, nb, n_blocks, K, DECODE, QK, UNIT, BB, NORM, EVEN)
    for b0 in range(BB, nb, BB):
        acc += _chunk_dots(W_ptr, T_ptr, X_ptr, NW_ptr, blk0, b0, nb, n_blocks, K, DECODE, QK, UNIT, BB, NORM, EVEN)
    return tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)


@triton.jit(do_not_specialize=["n_x"])
def _gemv_kernel(W_ptr, T_ptr, X_ptr, NW_ptr, R_ptr, Y_ptr, N, K, nb, n_blocks, eps, n_x, sx, sr, sy,
                 DECODE: tl.constexpr, QK: tl.constexpr, UNIT: tl.constexpr, BB: tl.constexpr,
                 BLOCK_N: tl.constexpr, XR: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
                 EVEN: tl.constexpr):
    """Y[i, r] = (R[i, r] +) W[r] . x'[i] for the BLOCK_N weight rows r of this program
    (grid axis 1) and its activation rows i (grid axis 0: XR of them, one after the other,
    each by the same code: row i's bits do not depend on n_x)."""
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows_in = tl.minimum(rows, N - 1)                     # loads stay inside W
    i0 = tl.program_id(0) * XR
    for i in range(i0, tl.minimum(i0 + XR, n_x)):
        x_ptr = X_ptr + i * sx
        acc = _row_dots(W_ptr, T_ptr, x_ptr, NW_ptr, rows_in, K, nb, n_blocks, DECODE, QK, UNIT, BB, NORM, EVEN)
        if NORM:
            acc = acc * _rstd(x_ptr, K, eps, 1024)
        if RESIDUAL:
            acc += tl.load(R_ptr + i * sr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(Y_ptr + i * sy + rows, acc, mask=rmask)


@triton.jit(do_not_specialize=["n_x"])
def _gemv_swiglu_kernel(WG_ptr, WU_ptr, T_ptr, X_ptr, NW_ptr, Y_ptr, N, K, nb, n_blocks, eps, n_x, sx, sy,
                        DECODE: tl.constexpr, QK: tl.constexpr, UNIT: tl.constexpr, BB: tl.constexpr,
                        BLOCK_N: tl.constexpr, XR: tl.constexpr, NORM: tl.constexpr, EVEN: tl.constexpr):
    """Y[i, r] = silu(Wg[r] . x'[i]) * (Wu[r] . x'[i]), silu(g) = g * sigmoid(g) (rows as
    in :func:`_gemv_kernel`)."""
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = tl.minimum(rows, N - 1)
    i0 = tl.program_id(0) * XR
    for i in range(i0, tl.minimum(i0 + XR, n_x)):
        x_ptr = X_ptr + i * sx
        g = _row_dots(WG_ptr, T_ptr, x_ptr, NW_ptr, rows_in, K, nb, n_blocks, DECODE, QK, UNIT, BB, NORM, EVEN)
        u = _row_dots(WU_ptr, T_ptr, x_ptr, NW_ptr, rows_in, K, nb, n_blocks, DECODE, QK, UNIT, BB, NORM, EVEN)
        if NORM:
            rstd = _rstd(x_ptr, K, eps, 1024)
            g = g * rstd
            u = u * rstd
        tl.store(Y_ptr + i * sy + rows, g * tl.sigmoid(g) * u, mask=rows < N)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: BLOCK_N weight rows per program, BB blocks per step, warps per
    program, and ``x_rows`` activation rows per program (one after the other; any value
    gives the same bits)."""

    block_n: int
    bb: int
    num_warps: int
    x_rows: int = 4


def gemv_config(w: PackedWeight) -> GemvConfig:
    """A launch shape for ``w`` (from the H100 sweep, benchmarks/gemv_sweep.py, one
    activation row): 4 rows per program and 1024 values per row per step; for very tall
    weights (the output projection) 8 rows and 512 values. Activation rows: 4 per program
    (not measured). On the CPU (Triton's interpreter, which runs programs one after the
    other) few large programs."""
    qk = w.layout.block_size
    nb = w.blocks_per_row
    if w.planes.device.type == "cpu":
        return GemvConfig(min(64, triton.next_power_of_2(w.n_rows)), triton.next_power_of_2(nb), 4, 64)
    tall = w.n_rows >= 16384
    values = 512 if tall else 1024
    bb = max(1, min(triton.next_power_of_2(nb), values // qk))
    return GemvConfig(8 if tall else 4, bb, 4)


def _rows_of(x: torch.Tensor, n_cols: int, n_rows: int, out: torch.Tensor | None,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, int, tuple[int, int, int]]:
    """Check the activation rows: x [n_cols] or [R, n_cols], out / residual [n_rows] or
    [R, n_rows] alike (made when None), each with contiguous rows (any row stride) ->
    (out, R, (x, residual, out) row strides)."""
    if x.dim() not in (1, 2) or x.shape[-1] != n_cols or (x.shape[-1] > 1 and x.stride(-1) != 1):
        raise ValueError(f"x must be [{n_cols}] or [R, {n_cols}] with contiguous rows, not {tuple(x.shape)}")
    lead = tuple(x.shape[:-1])
    if out is None:
        out = torch.empty(*lead, n_rows, dtype=torch.float32, device=x.device)
    for t in (out, residual):
        if t is not None and (tuple(t.shape) != lead + (n_rows,) or (n_rows > 1 and t.stride(-1) != 1)
                              or t.dtype != torch.float32):
            raise ValueError(f"outputs and residuals must be float32 {lead + (n_rows,)} with contiguous rows")
    n_x = x.shape[0] if x.dim() == 2 else 1

    def stride(t: torch.Tensor | None) -> int:
        return t.stride(0) if t is not None and t.dim() == 2 else 0

    return out, n_x, (stride(x), stride(residual), stride(out))


def gemv(w: PackedWeight, x: torch.Tensor, out: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         residual: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """``W @ x'`` for x: [n_cols] (float32/16) -> float32 [n_rows]; or for each row of
    x: [R, n_cols] -> float32 [R, n_rows], row i bit-identical to the call on ``x[i]``
    (the same program, whatever R). Rows contiguous, any row stride (also of ``out``).

    ``norm_weight`` [n_cols] turns on the fused RMSNorm prologue with ``eps`` (each row
    normed by its own RMS); ``residual`` float32 shaped as ``out`` is added (it may be ``out``).
    """
    c = codec(w.ggml_type)
    if c is None:
        raise ValueError(f"no fused kernel for {w.ggml_type.name}")
    out, n_x, (sx, sr, sy) = _rows_of(x, w.n_cols, w.n_rows, out, residual)
    if n_x == 0:
        return out
    cfg = config or gemv_config(w)
    nb = w.blocks_per_row
    grid = (triton.cdiv(n_x, cfg.x_rows), triton.cdiv(w.n_rows, cfg.block_n))
    _gemv_kernel[grid](
        w.planes, codebook(x.device), x, norm_weight if norm_weight is not None else x,
        residual if residual is not None else out, out,
        w.n_rows, w.n_cols, nb, w.n_rows * nb, eps, n_x, sx, sr, sy,
        DECODE=c.fn, QK=c.block_size, UNIT=unit(c), BB=cfg.bb, BLOCK_N=cfg.block_n, XR=cfg.x_rows,
        NORM=norm_weight is not None, RESIDUAL=residual is not None, EVEN=nb % cfg.bb == 0,
        num_warps=cfg.num_warps)
    return out


def gemv_swiglu(wg: PackedWeight, wu: PackedWeight, x: torch.Tensor, out: torch.Tensor | None = None, *,
                norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                config: GemvConfig | None = None) -> torch.Tensor:
    """``silu(Wg @ x') * (Wu @ x')``; Wg and Wu share type and shape. -> float32 [n_rows],
    or [R, n_rows] for x [R, n_cols] (rows as in :func:`gemv`)."""
    if (wg.ggml_type, wg.n_rows, wg.n_cols) != (wu.ggml_type, wu.n_rows, wu.n_cols):
        raise ValueError("gate and up weights must share type and shape")
    c = codec(wg.ggml_type)
    if c is None:
        raise ValueError(f"no fused kernel for {wg.ggml_type.name}")
    out, n_x, (sx, _, sy) = _rows_of(x, wg.n_cols, wg.n_rows, out)
    if n_x == 0:
        return out
    cfg = config or gemv_config(wg)
    nb = wg.blocks_per_row
    grid = (triton.cdiv(n_x, cfg.x_rows), triton.cdiv(wg.n_rows, cfg.block_n))
    _gemv_swiglu_kernel[grid](
        wg.planes, wu.planes, codebook(x.device), x, norm_weight if norm_weight is not None else x, out,
        wg.n_rows, wg.n_cols, nb, wg.n_rows * nb, eps, n_x, sx, sy,
        DECODE=c.fn, QK=c.block_size, UNIT=unit(c), BB=cfg.bb, BLOCK_N=cfg.block_n, XR=cfg.x_rows,
        NORM=norm_weight is not None, EVEN=nb % cfg.bb == 0, num_warps=cfg.num_warps)
    return out


# ---------------------------------------------------------------------------------------
# Plain-torch twin
# ---------------------------------------------------------------------------------------

def dequantized(w: PackedWeight) -> torch.Tensor:
    """W as float64 [n_rows, n_cols], through the exact torch dequantizer."""
    from gguflm.quant import dequantize

    return dequantize(w.blocks().reshape(-1), w.ggml_type, (w.n_cols, w.n_rows)).double()


def gemv_reference(w: PackedWeight, x: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
                   eps: float = 0.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`gemv` computes, in float64 torch ops (x [n_cols] or [R, n_cols])."""
    x = x.double()
    if norm_weight is not None:
        x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * norm_weight.double()
    y = x @ dequantized(w).T
    return y + residual.double() if residual is not None else y


def gemv_swiglu_reference(wg: PackedWeight, wu: PackedWeight, x: torch.Tensor, *,
                          norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """What :func:`gemv_swiglu` computes, in float64 torch ops."""
    g = gemv_reference(wg, x, norm_weight=norm_weight, eps=eps)
    u = gemv_reference(wu, x, norm_weight=norm_weight, eps=eps)
    return torch.nn.functional.silu(g) * u
