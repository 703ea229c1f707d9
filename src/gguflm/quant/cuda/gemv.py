"""Fused dequantize x GEMV for batch-1 decode in CUDA C++ (``gemv.cu``), for the types of
the common llama.cpp mixes: Q4_0, Q8_0, Q4_K, Q6_K. Same contract and plain-torch twins as
:mod:`gguflm.quant.triton.gemv` (``gemv_reference``, ``gemv_swiglu_reference``), plus
:func:`gemv_multi`: several weights that read the same activations (Q, K and V, of
two types too) in one launch, and :func:`gemv_argmax`: the output projection with the
greedy argmax in its epilogue.

:func:`gemv`, :func:`gemv_multi`, :func:`gemv_swiglu` and :func:`gemv_argmax` are the
entry points the model uses: each runs the CUDA kernel when it covers the call
(:func:`supported`) and the library is built for the device, and the Triton kernel (or
torch.argmax) otherwise. ``GGUFLM_GEMV=triton`` forces the Triton kernels, ``hybrid`` uses
the CUDA ones only where they won launch by launch without PDL; ``GGUFLM_PDL=0`` turns
programmatic dependent launch off. A failed build says so once on stderr and falls back.

With x [R, K] (the server's batched decode rows) :func:`gemv`, :func:`gemv_multi` and
:func:`gemv_swiglu` run a rows kernel (a second library, :func:`rows_library`, built on
first use or by :func:`start_rows`): one launch, row r bit-identical to the 1-row call on
x[r] whatever R (see gemv.cu); the tile kernel by default, the warp kernel with
``GGUFLM_CUDA_ROWS_KERNEL=warp`` (:func:`rows_kernel`); the Triton rows kernel where no row
would take the CUDA one.
Measured on an H200 (benchmarks/cuda_notes.md, 2026-12-04): the decode step of TinyLlama
Q4_K_M 967 -> 815 us, Q4_0 841 -> 763 us against the Triton kernels.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gguflm.gguf.types import GGMLType
from gguflm.quant.triton import gemv as tg
from gguflm.quant.triton.planes import PackedWeight

TYPES = (GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K)
MAX_SEGS = 4
SMEM_LIMIT = 200 * 1024  # bytes of activations a CTA stages (dynamic shared memory)
INSTANCES = {(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (1, 6)}  # (R, U) built for each type
PAIRS = {(GGMLType.Q4_K, GGMLType.Q6_K), (GGMLType.Q4_0, GGMLType.Q8_0)}  # two types in one launch
PAIR_INSTANCES = {(1, 2), (2, 1)}
ROWS_NX = 8  # gemv.cu's ROWS_NX: activation rows per CTA of the rows kernel
ROWS_RW = (1, 2)  # weight rows per warp of its instances
ROWS_SMEM = 100 * 1024  # bytes of staged rows of x per CTA of the rows kernel (see rows_tile)
TILE_NX = (4, 8)  # gemv.cu's tile kernel instances: rows of x per tile
TILE_WR = 4  # gemv.cu's TILE_WR: weight rows per warp of the tile kernel (2 output rows with SWIGLU)


def rows_kernel() -> str:
    """``GGUFLM_CUDA_ROWS_KERNEL``: which CUDA kernel runs x [R, K] (R >= 2): ``tile`` (the
    default: gemv_tile_kernel, each weight decoded once per tile of up to 8 rows of x, 4
    weight rows per warp sharing each read of x) or ``warp`` (gemv_rows_kernel, one or two
    weight rows per warp). Both give each row the 1-row kernel's bits."""
    k = os.environ.get("GGUFLM_CUDA_ROWS_KERNEL", "").lower()
    return k if k in ("tile", "warp") else "tile"


TILE_SMEM_LIMIT = 216 * 1024  # bytes of dynamic shared memory of a tile kernel CTA (sm_90: 227 KB in all)


def tile_smem(n_cols: int, nx: int) -> int:
    """Dynamic shared memory of a tile kernel CTA: nx rows of x' and their chunk sums, in a
    layout of nx + 1 slots per group (gemv.cu)."""
    return (nx + 1) * (4 * n_cols + 8 * (n_cols // 32))


def tile_plan(n_cols: int, n_x: int, nx: int | None = None) -> tuple[int, int] | None:
    """(nx, tile) of the tile kernel for ``n_x`` rows of x: the instance (TILE_NX) and the
    rows per CTA column (balanced: ceil(n_x / tiles)) that minimize a rough per-weight cost,
    tiles x (1.3 nx + 3) (an FMA and a share of the chunk's tail per row of the tile, the
    decode once per tile; padded rows cost as real ones); None: no instance fits the shared
    memory (then the warp kernel). ``nx``: that instance only. The bits of a row never
    depend on it."""
    best = None
    for n in TILE_NX if nx is None else (nx,):
        if n not in TILE_NX or tile_smem(n_cols, n) > TILE_SMEM_LIMIT:
            continue
        tiles = -(-n_x // n)
        cost = tiles * (1.3 * n + 3)
        if best is None or cost < best[0]:
            best = (cost, n, -(-n_x // tiles))
    return None if best is None else best[1:]


def tile_groups(ws: Sequence[PackedWeight], rows_per_group: int, tiles: int, n_sm: int) -> int:
    """Groups of weight rows per CTA of the tile kernel (each CTA stages its tile of x once
    for all of them): the most of 1, 2, 4, 8 that still leaves >= 4 CTAs per SM (about two
    waves at 2 CTAs per SM: a short last wave idles less). A guess until timed on the GPU
    (benchmarks/cuda_gemv_rows_bench.py --kernels tile,tile_g1,tile_g4); the bits of a row
    never depend on it."""
    best = 1
    for g in (2, 4, 8):
        if sum(-(-w.n_rows // (rows_per_group * g)) for w in ws) * tiles >= 4 * n_sm:
            best = g
    return best


def rows_per_warp(n_x: int) -> int:
    """Weight rows per warp of the rows kernel for ``n_x`` activation rows: 2 from 8 rows
    (each activation run read from shared memory serves two weight rows: the reads of x
    bound the kernel when many rows share a weight chunk), else 1 (more warps in flight).
    A guess until timed on the GPU (benchmarks/cuda_gemv_rows_bench.py); the bits of a row
    never depend on it."""
    return 2 if n_x >= 8 else 1


class _Seg(ctypes.Structure):
    _fields_ = [("planes", ctypes.c_void_p), ("planes2", ctypes.c_void_p), ("n_blocks", ctypes.c_longlong),
                ("out", ctypes.c_void_p), ("residual", ctypes.c_void_p), ("n_rows", ctypes.c_int),
                ("type", ctypes.c_int), ("cta_begin", ctypes.c_int), ("pad_", ctypes.c_int)]


class _Params(ctypes.Structure):
    _fields_ = [("seg", _Seg * MAX_SEGS), ("x", ctypes.c_void_p), ("norm", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("K", ctypes.c_int), ("n_seg", ctypes.c_int), ("n_cta", ctypes.c_int),
                ("argmax_out", ctypes.c_void_p), ("part_val", ctypes.c_void_p), ("part_idx", ctypes.c_void_p),
                ("counter", ctypes.c_void_p), ("n_x", ctypes.c_int), ("x_ld", ctypes.c_int), ("tile", ctypes.c_int),
                ("groups", ctypes.c_int), ("out_ld", ctypes.c_int * MAX_SEGS), ("res_ld", ctypes.c_int * MAX_SEGS)]


class ArgmaxWorkspace:
    """Per-CTA partial maxima and the arrival counter of the argmax epilogue: one per
    call site (a captured graph keeps its pointers; two launches in flight at once must
    not share one)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.val = self.idx = None
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)

    def ensure(self, n_cta: int) -> None:
        if self.val is None or self.val.numel() < n_cta:
            self.val = torch.empty(n_cta, dtype=torch.float32, device=self.device)
            self.idx = torch.empty(n_cta, dtype=torch.int32, device=self.device)


@dataclass(frozen=True)
class CudaGemvConfig:
    """Launch shape: ``rows`` per warp (R), ``unroll`` chunks per lane loaded at once (U),
    ``warps`` per CTA."""

    rows: int
    unroll: int
    warps: int


def gemv_config(n_rows: int, n_cols: int, swiglu: bool = False) -> CudaGemvConfig:
    """A launch shape for a weight of ``n_rows x n_cols`` (the fastest of the H200 sweep,
    benchmarks/cuda_gemv_bench.py, 2026-12-04): rows of <= 2048 values: gate+up and the tall
    output projection 2 rows per warp and one chunk per lane in flight per row, the others
    1 row and 2 chunks; longer rows (down, 5632): 1 row, 6 chunks per lane, 8 warps."""
    per_lane = -(-n_cols // 1024)
    if per_lane <= 1:
        return CudaGemvConfig(1, 1, 4)
    if per_lane <= 2:
        return CudaGemvConfig(2, 1, 4) if (swiglu or n_rows >= 16384) else CudaGemvConfig(1, 2, 4)
    return CudaGemvConfig(1, 3, 8) if per_lane <= 3 else CudaGemvConfig(1, 6, 8)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

_warned = False
_libs: dict[int, ctypes.CDLL | None] = {}
_dry = False  # see dry_run()


@contextmanager
def dry_run() -> Iterator[None]:
    """Within: no CUDA GEMV launches, and :func:`enabled` says whether the kernels are
    expected (built, or nvcc there to build them) without waiting for a build in progress.
    For tracing which Triton kernels a step uses (:mod:`gguflm.model.cuda.precompile`)."""
    global _dry
    _dry = True
    try:
        yield
    finally:
        _dry = False


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.gguflm_gemv.argtypes = [ctypes.POINTER(_Params), ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.gguflm_gemv.restype = ctypes.c_int
    lib.gguflm_gemv_emulate.argtypes = [ctypes.POINTER(_Params), ctypes.c_int, ctypes.c_int]
    lib.gguflm_gemv_emulate.restype = ctypes.c_int
    lib.gguflm_gemv_emulate_tile.argtypes = [ctypes.POINTER(_Params), ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.gguflm_gemv_emulate_tile.restype = ctypes.c_int
    lib.gguflm_error_string.restype = ctypes.c_char_p
    if lib.gguflm_params_size() != ctypes.sizeof(_Params):
        raise RuntimeError("gemv.cu's Params and the ctypes mirror disagree")
    return lib


def library(device: torch.device | None = None, quiet: bool = False) -> ctypes.CDLL | None:
    """The built kernels for ``device`` (a CUDA device; None: for the CPU emulation), or
    None when they cannot be built here (said once on stderr unless ``quiet``)."""
    global _warned
    from gguflm.quant.cuda.build import KernelsUnavailable, library as build

    key = -1 if device is None else torch.device(device).index or 0
    if key in _libs:
        return _libs[key]
    try:
        lib = _bind(build("sm_90" if device is None else _arch(torch.device(device))))
    except (KernelsUnavailable, RuntimeError, OSError, AttributeError) as e:
        if not _warned and not quiet:
            print(f"gguflm: the CUDA GEMV kernels are unavailable ({str(e).splitlines()[0][:300]}); "
                  f"using the Triton kernels", file=sys.stderr)
            _warned = True
        lib = None
    _libs[key] = lib
    return lib


_rows_libs: dict[int, ctypes.CDLL | None] = {}


def rows_library(device: torch.device, quiet: bool = True) -> ctypes.CDLL | None:
    """The rows kernels (x [R, K]; build.py's second library, built on first use or by
    :func:`start_rows`) for the CUDA ``device``, or None when they cannot be built here
    (then x [R, K] runs one 1-row launch per row: the same bits)."""
    from gguflm.quant.cuda.build import KernelsUnavailable, library as build

    key = torch.device(device).index or 0
    if key in _rows_libs:
        return _rows_libs[key]
    try:
        lib = build(_arch(torch.device(device)), "rows")
        lib.gguflm_gemv_rows.argtypes = [ctypes.POINTER(_Params), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        lib.gguflm_gemv_rows.restype = ctypes.c_int
        lib.gguflm_gemv_tile.argtypes = lib.gguflm_gemv_rows.argtypes
        lib.gguflm_gemv_tile.restype = ctypes.c_int
        if lib.gguflm_rows_params_size() != ctypes.sizeof(_Params):
            raise RuntimeError("gemv.cu's Params and the ctypes mirror disagree")
    except (KernelsUnavailable, RuntimeError, OSError, AttributeError) as e:
        if not quiet:
            print(f"gguflm: the CUDA rows GEMV kernels are unavailable ({str(e).splitlines()[0][:300]}); "
                  f"one launch per row", file=sys.stderr)
        lib = None
    _rows_libs[key] = lib
    return lib


def start_rows(device: torch.device) -> None:
    """Start building the rows kernels for ``device`` in the background (a server that will
    batch decode rows calls it at load: the first x [R, K] call then does not wait for nvcc)."""
    from gguflm.quant.cuda.build import nvcc, start

    if device.type == "cuda" and mode() != "triton" and nvcc() is not None:
        start(_arch(device), "rows")


def mode() -> str:
    """``GGUFLM_GEMV``: ``triton`` (never the CUDA kernels), ``cuda`` (wherever they apply;
    the default: fastest decode step on the H200, with PDL), ``hybrid`` (only gate+up, the
    tall output projection and mixed-type Q/K/V, where they won one by one without PDL)."""
    m = os.environ.get("GGUFLM_GEMV", "").lower()
    return m if m in ("triton", "cuda", "hybrid") else "cuda"


def pdl(device: torch.device) -> bool:
    """Launch with programmatic dependent launch: on Hopper and later (compute capability
    >= 9), unless ``GGUFLM_PDL=0``."""
    return os.environ.get("GGUFLM_PDL", "1") != "0" and torch.cuda.get_device_capability(device)[0] >= 9


def enabled(device: torch.device) -> bool:
    """The CUDA kernels will run on ``device`` (a CUDA device, not forced off, built)."""
    if device.type != "cuda" or mode() == "triton":
        return False
    if _dry:
        from gguflm.quant.cuda.build import nvcc

        key = torch.device(device).index or 0
        return _libs[key] is not None if key in _libs else nvcc() is not None
    return library(device) is not None


# ---------------------------------------------------------------------------------------
# Calls
# ---------------------------------------------------------------------------------------

def _aligned(t: torch.Tensor, n: int = 16) -> bool:
    return t.data_ptr() % n == 0


def supported(w: PackedWeight, x: torch.Tensor) -> bool:
    """The CUDA kernel covers ``w`` times ``x``: a covered type, float32 contiguous x whose
    row fits the CTA's shared memory, and 16-byte aligned quant planes. x [R, K]: contiguous
    rows, each 16-byte aligned (the row stride a multiple of 4)."""
    if x.dtype != torch.float32 or not _aligned(x):
        return False
    if not (x.is_contiguous() if x.dim() == 1 else (x.stride(-1) == 1 and x.stride(0) % 4 == 0)):
        return False
    return _weight_supported(w)


def _weight_supported(w: PackedWeight) -> bool:
    """What :func:`supported` asks of the weight alone."""
    if w.ggml_type not in TYPES:
        return False
    if w.n_cols % 32 or w.n_cols * 4 > SMEM_LIMIT or not _aligned(w.planes):
        return False
    n = w.n_rows * w.blocks_per_row
    if w.ggml_type in (GGMLType.Q4_0, GGMLType.Q8_0) and (2 * n) % 16:   # the qs plane starts at 2n
        return False
    return True


def _params(ws: Sequence[PackedWeight], outs: Sequence[torch.Tensor], x: torch.Tensor,
            norm_weight: torch.Tensor | None, eps: float, residuals: Sequence[torch.Tensor | None],
            rows_per_cta: int, ups: Sequence[PackedWeight] | None = None) -> _Params:
    p = _Params()
    cta = 0
    two_d = x.dim() == 2
    for i, w in enumerate(ws):
        p.out_ld[i] = outs[i].stride(0) if two_d else 0
        p.res_ld[i] = residuals[i].stride(0) if two_d and residuals[i] is not None else 0
        s = p.seg[i]
        s.planes = w.planes.data_ptr()
        s.planes2 = ups[i].planes.data_ptr() if ups is not None else 0
        s.n_blocks = w.n_rows * w.blocks_per_row
        s.out = outs[i].data_ptr()
        s.residual = residuals[i].data_ptr() if residuals[i] is not None else 0
        s.n_rows = w.n_rows
        s.type = int(w.ggml_type)
        s.cta_begin = cta
        cta += -(-w.n_rows // rows_per_cta)
    p.x = x.data_ptr()
    p.norm = norm_weight.data_ptr() if norm_weight is not None else 0
    p.eps = eps
    p.K = ws[0].n_cols
    p.n_seg = len(ws)
    p.n_cta = cta
    p.n_x = x.shape[0] if two_d else 1
    p.x_ld = x.stride(0) if two_d else p.K
    p.tile = rows_tile(p.K, p.n_x)
    return p


_sms: dict[int, int] = {}


def _n_sm(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (132 for anything else: an H100/H200)."""
    if device.type != "cuda":
        return 132
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _sms:
        _sms[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _sms[key]


def rows_tile(n_cols: int, n_x: int) -> int:
    """Activation rows per CTA of the rows kernel (x' of each staged in shared memory): up to
    ROWS_NX, as many as fit ROWS_SMEM (two CTAs per SM: 8 rows of 2048 values, 4 of 5632),
    at least one if it fits SMEM_LIMIT; 0: none fits. The bits of a row never depend on it."""
    if 4 * n_cols > SMEM_LIMIT:
        return 0
    return max(1, min(ROWS_NX, n_x, ROWS_SMEM // (4 * n_cols)))


def _check_out(out: torch.Tensor, n: int, rows: int | None = None) -> None:
    shape = (n,) if rows is None else (rows, n)
    if out.dtype != torch.float32 or tuple(out.shape) != shape or (n > 1 and out.stride(-1) != 1):
        raise ValueError(f"outputs must be float32 {list(shape)} with unit column stride")


def _config(ws: Sequence[PackedWeight], swiglu: bool, config: CudaGemvConfig | None) -> CudaGemvConfig:
    """The 1-row launch shape (the rows kernel takes its warps: the sum of squares of x is
    reduced over a CTA's threads, so equal warps give equal bits)."""
    cfg = config or gemv_config(max(w.n_rows for w in ws), ws[0].n_cols, swiglu=swiglu)
    if len({w.ggml_type for w in ws}) == 2 and (cfg.rows, cfg.unroll) not in PAIR_INSTANCES:
        cfg = CudaGemvConfig(1, 2, cfg.warps)
    return cfg


def launch(ws: Sequence[PackedWeight], x: torch.Tensor, outs: Sequence[torch.Tensor], *,
           norm_weight: torch.Tensor | None = None, eps: float = 0.0,
           residuals: Sequence[torch.Tensor | None] | None = None, ups: Sequence[PackedWeight] | None = None,
           config: CudaGemvConfig | None = None, argmax: tuple[torch.Tensor, ArgmaxWorkspace] | None = None,
           rows_rw: int | None = None, rows_tile_: int | None = None, kernel: str | None = None,
           tile_nx: int | None = None, tile_groups_: int | None = None) -> None:
    """One launch of the CUDA kernel over the weights ``ws`` (segments of one grid) that all
    read ``x``; the caller has checked :func:`supported`. ``ups``: SWIGLU (one segment).
    ``argmax``: (int64 [1] out, workspace): also the first index of the largest output (one
    segment, no SWIGLU, x [K]). x [R, K] with outs (and residuals) [R, n_i]: the rows kernel,
    one weight row per warp and up to ROWS_NX activation rows per CTA, with the warps of the
    1-row launch shape, ``rows_rw`` weight rows per warp (default :func:`rows_per_warp`) and
    ``rows_tile_`` rows of x per CTA (default :func:`rows_tile`; both for timing sweeps); or
    with ``kernel`` "tile" (default: :func:`rows_kernel`) the tile kernel, ``tile_nx`` rows of
    x per tile at most and ``tile_groups_`` groups of weight rows per CTA (defaults
    :func:`tile_plan`, :func:`tile_groups`); row r of each output is bit-identical to the 1-row
    kernel on x[r] (R = 1 runs the 1-row kernel itself)."""
    if not 1 <= len(ws) <= MAX_SEGS or any(w.n_cols != ws[0].n_cols for w in ws):
        raise ValueError(f"1..{MAX_SEGS} weights of one row length")
    residuals = residuals or [None] * len(ws)
    rows = None if x.dim() == 1 else x.shape[0]
    if rows == 0:
        return
    for w, o, r in zip(ws, outs, residuals):
        _check_out(o, w.n_rows, rows)
        if r is not None:
            _check_out(r, w.n_rows, rows)
    if rows == 1:
        return launch(ws, x[0], [o[0] for o in outs], norm_weight=norm_weight, eps=eps,
                      residuals=[r[0] if r is not None else None for r in residuals], ups=ups, config=config,
                      argmax=argmax)
    types = sorted({int(w.ggml_type) for w in ws})
    if len(types) > 2 or (len(types) == 2 and tuple(types) not in {(int(a), int(b)) for a, b in PAIRS}):
        raise ValueError(f"no kernel for the types {types} in one launch")
    cfg = _config(ws, ups is not None, config)
    if (cfg.rows, cfg.unroll) not in INSTANCES or not 1 <= cfg.warps <= 8:
        raise ValueError(f"no kernel instance for {cfg}")
    rw = rows_rw or rows_per_warp(rows or 1)
    if rows is not None and (argmax is not None or rows_tile(ws[0].n_cols, rows) < 1 or rw not in ROWS_RW):
        raise ValueError("x [R, K]: no argmax epilogue, a row of x must fit the shared memory, "
                         f"{ROWS_RW} weight rows per warp")
    kernel = (kernel or rows_kernel()) if rows is not None else None
    plan = tile_plan(ws[0].n_cols, rows, tile_nx) if kernel == "tile" else None
    if kernel == "tile" and plan is None:
        if tile_nx is not None:
            raise ValueError(f"no tile kernel instance of {tile_nx} rows fits the shared memory")
        kernel = "warp"
    if kernel == "tile":
        per_group = cfg.warps * (TILE_WR // (2 if ups is not None else 1))
        tiles = -(-rows // plan[1])
        groups = tile_groups_ or tile_groups(ws, per_group, tiles, _n_sm(x.device))
        p = _params(ws, outs, x, norm_weight, eps, residuals, per_group * groups, ups)
        p.tile, p.groups = plan[1], groups
    else:
        p = _params(ws, outs, x, norm_weight, eps, residuals,
                    cfg.rows * cfg.warps if rows is None else cfg.warps * rw, ups)
    if kernel == "warp" and rows_tile_ is not None:
        if not 1 <= rows_tile_ <= ROWS_NX or 4 * rows_tile_ * p.K > SMEM_LIMIT:
            raise ValueError(f"rows_tile_ must be 1..{ROWS_NX} rows fitting {SMEM_LIMIT} bytes")
        p.tile = rows_tile_
    if argmax is not None:
        target, aws = argmax
        if len(ws) != 1 or ups is not None or target.dtype != torch.int64 or target.numel() != 1:
            raise ValueError("the argmax epilogue takes one weight and an int64 [1] output")
        aws.ensure(p.n_cta)
        p.argmax_out, p.part_val, p.part_idx = target.data_ptr(), aws.val.data_ptr(), aws.idx.data_ptr()
        p.counter = aws.counter.data_ptr()
    if _dry:
        return
    lib = library(x.device)
    rlib = rows_library(x.device) if rows is not None and x.device.type == "cuda" else None
    if x.device.type != "cuda" or lib is None or (rows is not None and rlib is None):
        raise RuntimeError("the CUDA GEMV kernels are not available on this device")
    stream = torch.cuda.current_stream(x.device).cuda_stream
    if rows is None:
        rc = lib.gguflm_gemv(ctypes.byref(p), types[0], types[-1], cfg.warps, cfg.rows, cfg.unroll,
                             int(ups is not None), int(pdl(x.device)), ctypes.c_void_p(stream))
    elif kernel == "tile":
        rc = rlib.gguflm_gemv_tile(ctypes.byref(p), types[0], types[-1], cfg.warps, plan[0], int(ups is not None),
                                   int(pdl(x.device)), ctypes.c_void_p(stream))
    else:
        rc = rlib.gguflm_gemv_rows(ctypes.byref(p), types[0], types[-1], cfg.warps, rw, int(ups is not None),
                                   int(pdl(x.device)), ctypes.c_void_p(stream))
    if rc != 0:
        msg = "no such instance" if rc < 0 else lib.gguflm_error_string(rc).decode()
        raise RuntimeError(f"CUDA GEMV launch failed: {msg}")


def emulate(ws: Sequence[PackedWeight], x: torch.Tensor, outs: Sequence[torch.Tensor], *,
            norm_weight: torch.Tensor | None = None, eps: float = 0.0,
            residuals: Sequence[torch.Tensor | None] | None = None,
            ups: Sequence[PackedWeight] | None = None, warps: int | None = None, kernel: str = "warp",
            tile_nx: int | None = None) -> None:
    """The kernel's arithmetic run on the CPU (CPU tensors), in the order of a CTA of
    ``warps`` warps (default: the launch shape's): for the tests, without a GPU. Bit for bit
    the kernel's but for rsqrtf and expf (the host's). x [K] or [R, K] as :func:`launch`;
    ``kernel`` "tile": the tile kernel's order (x [R, K], ``tile_nx`` as :func:`launch`)."""
    lib = library(None, quiet=True)
    if lib is None:
        raise RuntimeError("the CUDA kernels cannot be built here (no nvcc)")
    residuals = residuals or [None] * len(ws)
    tensors = [x, norm_weight, *outs, *[w.planes for w in ws], *[r for r in residuals if r is not None]]
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        raise ValueError("emulate() takes CPU tensors")
    if x.stride(-1) != 1:
        raise ValueError("x rows must be contiguous")
    p = _params(ws, outs, x, norm_weight, eps, residuals, 1, ups)
    if p.tile < 1:
        raise ValueError("a row of x must fit the shared memory")
    warps = warps or _config(ws, ups is not None, None).warps
    if kernel == "tile":
        plan = tile_plan(p.K, p.n_x, tile_nx)
        if plan is None:
            raise ValueError("no tile kernel instance fits the shared memory")
        p.tile = plan[1]
        rc = lib.gguflm_gemv_emulate_tile(ctypes.byref(p), int(ups is not None), warps, plan[0])
    else:
        rc = lib.gguflm_gemv_emulate(ctypes.byref(p), int(ups is not None), warps)
    if rc != 0:
        raise RuntimeError(f"emulation failed ({rc})")


# ---------------------------------------------------------------------------------------
# Dispatch: CUDA kernel where it applies, Triton otherwise
# ---------------------------------------------------------------------------------------

def _rows_of(x: torch.Tensor) -> int | None:
    """None for one activation row x [K]; R for x [R, K]."""
    if x.dim() == 1:
        return None
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("x must be [n_cols] or [rows, n_cols] with contiguous rows")
    return x.shape[0]


def _check_rows(x: torch.Tensor, n_cols: int, tensors: Sequence[tuple[torch.Tensor | None, int]]) -> None:
    """x [R, n_cols]; each (t, n) of ``tensors`` (None: absent) is [R, n] with stride(-1) == 1."""
    if x.shape[1] != n_cols:
        raise ValueError(f"x has {x.shape[1]} columns, the weight {n_cols}")
    for t, n in tensors:
        if t is not None and (t.dim() != 2 or tuple(t.shape) != (x.shape[0], n)
                              or (n > 1 and t.stride(-1) != 1)):
            raise ValueError(f"expected [{x.shape[0]}, {n}] with unit column stride, got {tuple(t.shape)}")


def _route(ws: Sequence[PackedWeight], x: torch.Tensor, norm_weight: torch.Tensor | None, cuda: bool) -> str:
    """How x [R, K] runs so that each row gets the bits of its 1-row call: ``cuda`` (the
    1-row call's conditions on the device, mode and weights hold): "rows" (the CUDA rows
    kernel, when x's rows are aligned for it too and it is built), else "each" (one 1-row
    call per row: some rows might take the CUDA kernel, some not); "triton" (no row would
    take the CUDA kernel: one Triton launch over the rows)."""
    if not cuda or not all(_weight_supported(w) for w in ws):
        return "triton"
    if x.dtype != torch.float32 or (norm_weight is not None and not _aligned(norm_weight)):
        return "triton"
    if all(supported(w, x) for w in ws) and (_dry or rows_library(x.device) is not None):
        return "rows"
    return "each"


def gemv(w: PackedWeight, x: torch.Tensor, out: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
         config: CudaGemvConfig | None = None) -> torch.Tensor:
    """``W @ x'`` (see :func:`gguflm.quant.triton.gemv.gemv`): CUDA kernel or Triton.

    x [n_cols] -> [n_rows], or x [R, n_cols] -> [R, n_rows] (out/residual [R, n_rows], any
    row stride): row r of the result is bit-identical to the call with x[r] alone."""
    rows = _rows_of(x)
    if out is None:
        out = torch.empty(w.n_rows if rows is None else (rows, w.n_rows), dtype=torch.float32, device=x.device)
    cuda = enabled(x.device) and (mode() == "cuda" or w.n_rows >= 16384)
    if rows is not None:
        _check_rows(x, w.n_cols, [(out, w.n_rows), (residual, w.n_rows)])
        route = _route([w], x, norm_weight, cuda)
        if route == "rows":
            launch([w], x, [out], norm_weight=norm_weight, eps=eps, residuals=[residual], config=config)
        elif route == "triton":
            tg.gemv(w, x, out, norm_weight=norm_weight, eps=eps, residual=residual)
        else:
            for r in range(rows):
                gemv(w, x[r], out[r], norm_weight=norm_weight, eps=eps,
                     residual=residual[r] if residual is not None else None, config=config)
        return out
    if cuda and supported(w, x) and (norm_weight is None or _aligned(norm_weight)):
        launch([w], x, [out], norm_weight=norm_weight, eps=eps, residuals=[residual], config=config)
        return out
    return tg.gemv(w, x, out, norm_weight=norm_weight, eps=eps, residual=residual)


def gemv_argmax(w: PackedWeight, x: torch.Tensor, out: torch.Tensor, argmax_out: torch.Tensor,
                ws: ArgmaxWorkspace, *, norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> bool:
    """``out = W @ x'`` and ``argmax_out[0] = argmax(out)`` (torch.argmax's choice: the first
    index of the largest value, NaN largest) in one launch: True when done, False when the
    CUDA kernel does not apply (the caller computes both its own way; x [R, K] never)."""
    if (x.dim() == 1 and enabled(x.device) and mode() == "cuda" and supported(w, x)
            and (norm_weight is None or _aligned(norm_weight))):
        launch([w], x, [out], norm_weight=norm_weight, eps=eps, argmax=(argmax_out, ws))
        return True
    return False


def gemv_multi(ws: Sequence[PackedWeight], x: torch.Tensor, outs: Sequence[torch.Tensor], *,
               norm_weight: torch.Tensor | None = None, eps: float = 0.0,
               config: CudaGemvConfig | None = None) -> None:
    """``outs[i] = W_i @ x'`` for weights of one row length (e.g. Q, K, V): one launch when
    the CUDA kernel covers all of them, else one Triton launch each. x [R, n_cols] with outs
    [R, n_i] (any row stride, e.g. a [R, total] buffer split along dim 1): row r of each
    output is bit-identical to the call with x[r] alone."""
    rows = _rows_of(x)
    types = {w.ggml_type for w in ws}
    cuda = (enabled(x.device) and len(ws) <= MAX_SEGS and len({w.n_cols for w in ws}) == 1
            and (len(types) == 1 or (len(types) == 2 and tuple(sorted(types)) in PAIRS))
            and (mode() == "cuda" or len(types) == 2))
    if rows is not None:
        _check_rows(x, ws[0].n_cols, [(o, w.n_rows) for w, o in zip(ws, outs)])
        route = _route(ws, x, norm_weight, cuda)
        if route == "rows":
            launch(ws, x, outs, norm_weight=norm_weight, eps=eps, config=config)
        elif route == "triton":
            for w, o in zip(ws, outs):
                tg.gemv(w, x, o, norm_weight=norm_weight, eps=eps)
        else:
            for r in range(rows):
                gemv_multi(ws, x[r], [o[r] for o in outs], norm_weight=norm_weight, eps=eps, config=config)
        return
    if cuda and all(supported(w, x) for w in ws) and (norm_weight is None or _aligned(norm_weight)):
        launch(ws, x, outs, norm_weight=norm_weight, eps=eps, config=config)
        return
    for w, o in zip(ws, outs):
        tg.gemv(w, x, o, norm_weight=norm_weight, eps=eps)


def gemv_swiglu(wg: PackedWeight, wu: PackedWeight, x: torch.Tensor, out: torch.Tensor | None = None, *,
                norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                config: CudaGemvConfig | None = None) -> torch.Tensor:
    """``silu(Wg @ x') * (Wu @ x')`` (see :func:`gguflm.quant.triton.gemv.gemv_swiglu`); x
    [R, n_cols] -> [R, n_rows] as in :func:`gemv`."""
    if (wg.ggml_type, wg.n_rows, wg.n_cols) != (wu.ggml_type, wu.n_rows, wu.n_cols):
        raise ValueError("gate and up weights must share type and shape")
    rows = _rows_of(x)
    if out is None:
        out = torch.empty(wg.n_rows if rows is None else (rows, wg.n_rows), dtype=torch.float32, device=x.device)
    cuda = enabled(x.device) and _aligned(wu.planes)
    if rows is not None:
        _check_rows(x, wg.n_cols, [(out, wg.n_rows)])
        route = _route([wg], x, norm_weight, cuda)
        if route == "rows":
            launch([wg], x, [out], norm_weight=norm_weight, eps=eps, ups=[wu], config=config)
        elif route == "triton":
            tg.gemv_swiglu(wg, wu, x, out, norm_weight=norm_weight, eps=eps)
        else:
            for r in range(rows):
                gemv_swiglu(wg, wu, x[r], out[r], norm_weight=norm_weight, eps=eps, config=config)
        return out
    if cuda and supported(wg, x) and (norm_weight is None or _aligned(norm_weight)):
        launch([wg], x, [out], norm_weight=norm_weight, eps=eps, ups=[wu], config=config)
        return out
    return tg.gemv_swiglu(wg, wu, x, out, norm_weight=norm_weight, eps=eps)
