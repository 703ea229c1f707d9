"""Fused dequantize x GEMM for many activation rows (prefill, batched decode steps),
straight from the field planes, on the tensor cores:

    Y[m, r] = sum_k X[m, k] * W[r, k]  (+ b[r])                      (_gemm_kernel)
    Y[m, r] = act(X[m] . Wg[r]) * (X[m] . Wu[r])                     (GATED; act SiLU or GELU-tanh)

X is float16 [M, K] (row stride free), W a :class:`PackedWeight` [N, K], Y float16 or
float32 [M, N] (row stride free: a column slice of a wider buffer, e.g. the V part of a
QKV block). One program owns ``BLOCK_N`` weight rows x ``BLOCK_M`` activation rows and
walks K ``BB`` blocks at a time: it decodes each weight tile once (the type's decoder
from :mod:`gguflm.quant.triton.codecs`), rounds it to float16 in registers and feeds it
with the matching activations to ``tl.dot`` (float32 accumulation). No float copy of
W is written anywhere.

Values come in the decoder's storage order, so the activations are gathered at the
decoder's ``kidx`` (runs of 16-32 consecutive elements) and both tiles are flattened the
same way: the dot runs over a permutation of the chunk's K positions, fixed per type.
The weight tile is the dot's left operand (``BLOCK_N`` >= 64 rows: Hopper's warp-group
MMA for any M), the activations its right one (``BLOCK_M`` >= 16 columns).

**Split-K.** A weight with few ``BLOCK_N`` tiles (2048 rows: 32 programs for a batched
decode step on a 132-SM GPU) cuts K into ``splits`` runs of whole K steps
(:func:`gemm_config`, from the weight's N and K alone). Each run's sum starts from zero,
and the runs' sums are added in order s = 0, 1, ..., S-1, from zero, in float32. For a
few rows (M <= SPLIT_MAX_M), and for a gated product at any M (its runs in turn would
need four accumulators: register spills past BLOCK_M 64), the runs are programs of their
own (grid axis 2) that store float32 partials [1 + GATED, S, M, N] (a fresh tensor from
torch's caching allocator: a CUDA graph captures its address in its own pool; at most
PARTIAL_ROWS rows per launch); :func:`_reduce_kernel` adds them and ends the product
(bias, act(g) * u, the output rounding). Otherwise one program runs the runs in turn and
adds them itself: the same operations in the same order, the same bits, no partials
traffic.

**Batch invariance.** Each output element is one fixed sequence of MMA steps: the
chunks in K order, BB blocks each, the same permutation inside a chunk, float32
accumulators, the runs of K added in order. ``BLOCK_N``, ``BB``, the splits, warps and
stages depend on the weight only (:func:`gemm_config`); only ``BLOCK_M`` and whether the
runs run in parallel follow M, and a row's result depends on neither nor on the other
rows of its tile. So a row of X gives the same bits whatever M is and wherever the row
sits in the batch (tests/cuda/test_gemm.py checks it at M = 1, 3, 17, 64, with and
without split-K, on the GPU and in Triton's interpreter).

:func:`gemm_reference` is the plain-torch twin: dequantize exactly, round to float16,
then matmul in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gguflm.quant.triton.codecs import codebook, codec, unit
from gguflm.quant.triton.planes import PackedWeight

CHUNK = 256  # K values a program decodes per step (BB blocks): one K-quant super-block
SPLIT_PROGRAMS = 256  # programs a split weight aims at for one BLOCK_M of rows (132 SMs on an H200)
SPLIT_MAX_M = 64  # up to this many rows the runs of K of a split weight run in parallel (partials)
PARTIAL_ROWS = 512  # rows of X per launch of the partials path (bounds the partials: a long prompt's gated GEMM)
REDUCE_N, REDUCE_M = 64, 16  # tile of the reduction of the partials


@triton.jit
def _weight_tile(W_ptr, T_ptr, blk0, b0, nb, n_blocks,
                 DECODE: tl.constexpr, QK: tl.constexpr, UNIT: tl.constexpr, BB: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Blocks b0 .. b0+BB-1 of BLOCK_N weight rows (``blk0``: [BLOCK_N] int64 first block
    of each row) as float16 [BLOCK_N, BB * QK] in the decoder's storage order, and the
    K positions of those values, [A, B, C] (``kidx`` offset by the chunk's start)."""
    f, scale, bias, kidx = DECODE(W_ptr, T_ptr, blk0 + b0, n_blocks, nb - b0, BB)
    if UNIT > 0:
        q = (f - 1.0) * UNIT                                                  # the code, exactly
    else:
        q = f                                                                 # a codebook value
    w = (q * scale + bias).to(tl.float16)                                     # [BN, A, B, C]
    return tl.reshape(w, [BLOCK_N, BB * QK]), b0 * QK + kidx


@triton.jit
def _activation_tile(X_ptr, xrow, k, K, BLOCK_M: tl.constexpr, BK: tl.constexpr):
    """X at rows ``xrow`` ([BLOCK_M] int64 offsets) and K positions ``k`` ([A, B, C]) as
    float16 [BK, BLOCK_M] in the same order as the weight tile; 0 past K."""
    x = tl.load(X_ptr + xrow[:, None, None, None] + k[None], mask=(k < K)[None], other=0.0)
    return tl.trans(tl.reshape(x.to(tl.float16), [BLOCK_M, BK]))


@triton.jit
def _k_run(acc, acc_u, W_ptr, WU_ptr, T_ptr, X_ptr, xrow, blk0, b_lo, b_hi, nb, n_blocks, K,
           DECODE: tl.constexpr, QK: tl.constexpr, UNIT: tl.constexpr, BB: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GATED: tl.constexpr):
    """Blocks b_lo .. b_hi-1 of K, BB at a time, MMA-accumulated onto ``acc`` (and, GATED,
    the up weight's onto ``acc_u``): float32 [BLOCK_N, BLOCK_M]."""
    for b0 in range(b_lo, b_hi, BB):
        w, k = _weight_tile(W_ptr, T_ptr, blk0, b0, nb, n_blocks, DECODE, QK, UNIT, BB, BLOCK_N)
        x = _activation_tile(X_ptr, xrow, k, K, BLOCK_M, BB * QK)
        acc = tl.dot(w, x, acc)
        if GATED:
            wu, k = _weight_tile(WU_ptr, T_ptr, blk0, b0, nb, n_blocks, DECODE, QK, UNIT, BB, BLOCK_N)
            acc_u = tl.dot(wu, x, acc_u)
    return acc, acc_u


@triton.jit
def _epilogue(acc, acc_u, B_ptr, rs, N, GATED: tl.constexpr, GELU: tl.constexpr, BIAS: tl.constexpr):
    """The float32 sums [BLOCK_N, BLOCK_M] of rows ``rs`` -> the output before its rounding:
    GATED act(g) * u with silu(g) = g sigmoid(g), or with GELU gelu_tanh(g) = g sigmoid(2 z),
    z = sqrt(2/pi) (g + 0.044715 g^3); then + b. One function for both kernels that end a
    product (the same operations, so the same bits)."""
    if GATED:
        if GELU:
            acc = acc * tl.sigmoid(2.0 * 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)) * acc_u
        else:
            acc = acc * tl.sigmoid(acc) * acc_u
    if BIAS:
        acc += tl.load(B_ptr + tl.minimum(rs, N - 1)).to(tl.float32)[:, None]
    return acc


@triton.jit(do_not_specialize=["M"])  # one compilation for every M of a BLOCK_M
def _gemm_kernel(W_ptr, WU_ptr, T_ptr, X_ptr, B_ptr, Y_ptr, P_ptr, M, N, K, nb, n_blocks, x_row_stride, y_row_stride,
                 split_blocks, n_splits,
                 DECODE: tl.constexpr, QK: tl.constexpr, UNIT: tl.constexpr, BB: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GATED: tl.constexpr, GELU: tl.constexpr,
                 BIAS: tl.constexpr, SPLIT: tl.constexpr, PARTIAL: tl.constexpr):
    """Y[m, r] for this program's BLOCK_M rows m (axis 0 of the grid: the programs that
    share a weight tile run side by side) and BLOCK_N weight rows r (axis 1).

    SPLIT: K is cut into ``n_splits`` runs of ``split_blocks`` blocks; each run's sum
    starts from zero and the runs' sums are added in order s = 0, 1, ... PARTIAL: this
    program computes run s = axis 2 only and stores its raw sums into the float32
    partials P [1 + GATED, n_splits, M, N] (:func:`_reduce_kernel` adds and ends them);
    else it runs every split in turn itself (the same additions, in registers)."""
    ms = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    xrow = tl.minimum(ms, M - 1).to(tl.int64) * x_row_stride                  # loads stay inside X
    blk0 = tl.minimum(rs, N - 1).to(tl.int64) * nb                            # and inside W
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if SPLIT:
        if PARTIAL:
            s_lo = tl.program_id(2)
            s_hi = s_lo + 1
        else:
            s_lo = 0
            s_hi = n_splits
        total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        total_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for s in range(s_lo, s_hi):
            run, run_u = _k_run(tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32),
                                tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32),
                                W_ptr, WU_ptr, T_ptr, X_ptr, xrow, blk0, s * split_blocks,
                                tl.minimum(s * split_blocks + split_blocks, nb), nb, n_blocks, K,
                                DECODE, QK, UNIT, BB, BLOCK_N, BLOCK_M, GATED)
            total += run
            if GATED:
                total_u += run_u
        acc = total
        acc_u = total_u
    else:
        acc, acc_u = _k_run(acc, acc_u, W_ptr, WU_ptr, T_ptr, X_ptr, xrow, blk0, 0, nb, nb, n_blocks, K,
                            DECODE, QK, UNIT, BB, BLOCK_N, BLOCK_M, GATED)
    inside = (rs < N)[:, None] & (ms < M)[None, :]
    if PARTIAL:
        ptrs = P_ptr + (tl.program_id(2) * M + ms.to(tl.int64))[None, :] * N + rs[:, None]
        tl.store(ptrs, acc, mask=inside)
        if GATED:
            tl.store(ptrs + n_splits * M * N, acc_u, mask=inside)
    else:
        acc = _epilogue(acc, acc_u, B_ptr, rs, N, GATED, GELU, BIAS)
        ptrs = Y_ptr + ms.to(tl.int64)[None, :] * y_row_stride + rs[:, None]
        tl.store(ptrs, acc.to(Y_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["M"])
def _reduce_kernel(P_ptr, B_ptr, Y_ptr, M, N, n_splits, y_row_stride,
                   GATED: tl.constexpr, GELU: tl.constexpr, BIAS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Y from the partials P [1 + GATED, n_splits, M, N]: the split sums added in order
    s = 0 .. n_splits - 1 from zero (as :func:`_gemm_kernel` adds them itself), then the
    epilogue and the output rounding."""
    ms = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rs < N)[:, None] & (ms < M)[None, :]
    ptrs = P_ptr + ms.to(tl.int64)[None, :] * N + rs[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for s in range(0, n_splits):
        acc += tl.load(ptrs + s * M * N, mask=inside, other=0.0)
        if GATED:
            acc_u += tl.load(ptrs + (n_splits + s) * M * N, mask=inside, other=0.0)
    acc = _epilogue(acc, acc_u, B_ptr, rs, N, GATED, GELU, BIAS)
    tl.store(Y_ptr + ms.to(tl.int64)[None, :] * y_row_stride + rs[:, None], acc.to(Y_ptr.dtype.element_ty),
             mask=inside)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmConfig:
    """Launch shape that fixes every output element's reduction order: ``block_n``
    weight rows per program, ``bb`` blocks per K step, warps and pipeline stages,
    ``splits`` runs of K summed apart then added in order (1: one sum over all of K);
    and the largest ``BLOCK_M`` (shared memory), which only bounds :func:`block_m`."""

    block_n: int
    bb: int
    num_warps: int
    num_stages: int
    max_block_m: int = 128
    splits: int = 1


def gemm_config(w: PackedWeight) -> GemmConfig:
    """The launch shape of ``w``: a function of the weight alone (never of M), so that a
    row's result does not depend on its batch. 64 weight rows (one warp-group MMA
    tile), CHUNK values per K step (fewer for a row shorter than that), 8 warps (no
    register spills at BLOCK_M 128, sm_90), 2 stages. Codebook types (IQ4_NL, IQ4_XS)
    gather through the codebook: 1 stage and BLOCK_M <= 64 keep them inside the shared
    memory of an SM (checked by benchmarks/gemm_compile_check.py). ``splits``: enough
    runs of K that a few rows (one BLOCK_M) keep SPLIT_PROGRAMS programs busy, at most
    one per K step (1 for wide weights: the output head)."""
    c = codec(w.ggml_type)
    bb = max(1, min(CHUNK // w.layout.block_size, triton.next_power_of_2(w.blocks_per_row)))
    tiles = triton.cdiv(w.n_rows, 64)
    splits = max(1, min(triton.cdiv(w.blocks_per_row, bb), triton.cdiv(SPLIT_PROGRAMS, tiles)))
    if c is not None and c.bits == 0:
        return GemmConfig(64, bb, 8, 1, 64, splits)
    return GemmConfig(64, bb, 8, 2, 128, splits)


def block_m(m: int, cap: int = 128) -> int:
    """Activation rows per program for M rows: 16 .. ``cap`` (a power of two)."""
    return min(cap, max(16, triton.next_power_of_2(m)))


def split_blocks(cfg: GemmConfig, blocks_per_row: int) -> tuple[int, int]:
    """(blocks per run of K, number of runs) of ``cfg.splits`` over a row of
    ``blocks_per_row`` blocks: whole K steps per run, no empty run."""
    steps = triton.cdiv(blocks_per_row, cfg.bb)
    per_run = triton.cdiv(steps, max(1, min(cfg.splits, steps))) * cfg.bb
    return per_run, triton.cdiv(blocks_per_row, per_run)


def _launch(w: PackedWeight, wu: PackedWeight | None, x: torch.Tensor, out: torch.Tensor | None,
            bias: torch.Tensor | None, out_dtype: torch.dtype, config: GemmConfig | None,
            bm: int | None, gelu: bool = False, parallel: bool | None = None) -> torch.Tensor:
    c = codec(w.ggml_type)
    if c is None:
        raise ValueError(f"no fused kernel for {w.ggml_type.name}")
    if x.dim() != 2 or x.shape[1] != w.n_cols or x.stride(1) != 1 or x.dtype != torch.float16:
        raise ValueError(f"x must be float16 [M, {w.n_cols}] with unit column stride")
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, w.n_rows, dtype=out_dtype, device=x.device)
    elif out.shape != (m, w.n_rows) or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {w.n_rows}] with unit column stride")
    if m == 0:
        return out
    cfg = config or gemm_config(w)
    nb, n = w.blocks_per_row, w.n_rows
    gated = wu is not None
    per_run, runs = split_blocks(cfg, nb)
    if parallel is None:  # a gated product's runs in turn need 4 accumulators: spills past BLOCK_M 64
        parallel = m <= SPLIT_MAX_M or gated
    parallel = parallel and runs > 1
    cap = cfg.max_block_m if parallel or runs == 1 or not gated else min(cfg.max_block_m, 64)   # registers
    bm = bm or block_m(m, cap)
    table = codebook(x.device)
    rows = PARTIAL_ROWS if parallel else m                  # partials of at most PARTIAL_ROWS rows at once
    partials = torch.empty((1 + gated) * runs * min(m, rows) * n, dtype=torch.float32, device=x.device) \
        if parallel else table
    for r0 in range(0, m, rows):
        xs, ys, mr = x[r0:r0 + rows], out[r0:r0 + rows], min(rows, m - r0)
        grid = (triton.cdiv(mr, bm), triton.cdiv(n, cfg.block_n), runs if parallel else 1)
        _gemm_kernel[grid](
            w.planes, wu.planes if gated else w.planes, table, xs,
            bias if bias is not None else ys, ys, partials, mr, n, w.n_cols, nb, n * nb, x.stride(0), out.stride(0),
            per_run, runs,
            DECODE=c.fn, QK=c.block_size, UNIT=unit(c), BB=cfg.bb, BLOCK_N=cfg.block_n, BLOCK_M=bm,
            GATED=gated, GELU=gelu, BIAS=bias is not None, SPLIT=runs > 1, PARTIAL=parallel,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if parallel:
            _reduce_kernel[(triton.cdiv(mr, REDUCE_M), triton.cdiv(n, REDUCE_N))](
                partials, bias if bias is not None else ys, ys, mr, n, runs, out.stride(0),
                GATED=gated, GELU=gelu, BIAS=bias is not None, BLOCK_N=REDUCE_N, BLOCK_M=REDUCE_M, num_warps=4)
    return out


def gemm(w: PackedWeight, x: torch.Tensor, out: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.float16, config: GemmConfig | None = None,
         bm: int | None = None, parallel: bool | None = None) -> torch.Tensor:
    """``x W^T (+ bias)``: x float16 [M, n_cols] -> [M, n_rows] (``out``, or a new tensor of
    ``out_dtype``). ``bias``: [n_rows], added in float32 before the output rounding.
    ``bm`` overrides :func:`block_m`, ``parallel`` whether the runs of K of a split
    weight run in programs of their own (default: for M <= SPLIT_MAX_M, gated always) —
    tests: neither may change a bit."""
    return _launch(w, None, x, out, bias, out_dtype, config, bm, parallel=parallel)


def gemm_gated(wg: PackedWeight, wu: PackedWeight, x: torch.Tensor, out: torch.Tensor | None = None, *,
               gelu: bool = False, config: GemmConfig | None = None, bm: int | None = None,
               parallel: bool | None = None) -> torch.Tensor:
    """``act(x Wg^T) * (x Wu^T)``, act SiLU (SwiGLU) or with ``gelu`` GELU-tanh (GeGLU), from
    the float32 accumulators, rounded once to float16; Wg and Wu share type and shape.
    -> float16 [M, n_rows]."""
    if (wg.ggml_type, wg.n_rows, wg.n_cols) != (wu.ggml_type, wu.n_rows, wu.n_cols):
        raise ValueError("gate and up weights must share type and shape")
    return _launch(wg, wu, x, out, None, torch.float16, config, bm, gelu, parallel)


# ---------------------------------------------------------------------------------------
# Plain-torch twin
# ---------------------------------------------------------------------------------------

def _half_weight(w: PackedWeight) -> torch.Tensor:
    """W as the kernel's operand: exact dequantization rounded to float16, as float64."""
    from gguflm.quant import dequantize

    return dequantize(w.blocks().reshape(-1), w.ggml_type, (w.n_cols, w.n_rows)).to(torch.float16).double()


def gemm_reference(w: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`gemm` computes before its output rounding, in float64: x W16^T (+ b)."""
    y = x.double().cpu() @ _half_weight(w).cpu().T
    return y + bias.double().cpu() if bias is not None else y


def gemm_gated_reference(wg: PackedWeight, wu: PackedWeight, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """What :func:`gemm_gated` computes before its output rounding, in float64."""
    g, u = gemm_reference(wg, x), gemm_reference(wu, x)
    act = torch.nn.functional.gelu(g, approximate="tanh") if gelu else torch.nn.functional.silu(g)
    return act * u
