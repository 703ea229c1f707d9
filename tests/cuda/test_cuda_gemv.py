"""The CUDA C++ GEMV kernels (gguflm/quant/cuda/gemv.cu) against outside oracles: libggml's
dequantizers (through the float64 products) and the plain-torch twins of the Triton module.

Without a GPU, the kernel's per-type code (block decoding, activation swizzle and offsets)
runs through its CPU emulation, which needs nvcc to build; on a GPU the kernels themselves
run, on fresh random data, with every launch shape that is built, and must be bit-identical
run to run."""

from __future__ import annotations

import ctypes

import pytest
import torch

from gguflm.gguf.types import LAYOUTS, GGMLType
from gguflm.quant.triton.gemv import gemv_reference, gemv_swiglu_reference
from gguflm.quant.triton.planes import PackedWeight

TYPES = [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K]


def _cuda_lib():
    from gguflm.quant.cuda.build import nvcc
    from gguflm.quant.cuda.gemv import library

    if nvcc() is None:
        pytest.skip("nvcc is not available: the CUDA kernels cannot be built here")
    lib = library(torch.device("cuda") if torch.cuda.is_available() else None, quiet=True)
    if lib is None:
        pytest.skip("the CUDA kernels did not build")
    return lib


def _weight(random_blocks, oracle, t, n_rows, blocks_per_row, seed):
    raw = random_blocks(t, n_rows * blocks_per_row, seed)
    n_cols = blocks_per_row * LAYOUTS[t].block_size
    w = PackedWeight.from_raw(raw, t, (n_cols, n_rows), "cpu")
    ref = torch.from_numpy(oracle(raw.reshape(-1), t, n_rows * n_cols)).double().view(n_rows, n_cols)
    return w, ref


def _rel(a, b) -> float:
    return float((a.double().cpu() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_emulation_matches_libggml(random_blocks, oracle, t):
    """The per-type decoding and activation indexing of the kernel, on the CPU."""
    _cuda_lib()
    from gguflm.quant.cuda.gemv import emulate

    bpr = 3 if LAYOUTS[t].block_size == 256 else 40
    w, ref = _weight(random_blocks, oracle, t, 24, bpr, seed=int(t))
    gen = torch.Generator().manual_seed(int(t))
    x, nw, r = (torch.randn(n, generator=gen) for n in (w.n_cols, w.n_cols, w.n_rows))
    out = torch.full((w.n_rows,), float("nan"))
    emulate([w], x, [out], residuals=[r])
    assert _rel(out, r.double() + ref @ x.double()) < 1e-5
    emulate([w], x, [out], norm_weight=nw, eps=1e-5)
    xd = x.double()
    assert _rel(out, ref @ (xd / torch.sqrt((xd * xd).mean() + 1e-5) * nw.double())) < 1e-5


def test_emulation_of_mixed_segments_and_swiglu(random_blocks, oracle):
    _cuda_lib()
    from gguflm.quant.cuda.gemv import emulate

    wq, q_ref = _weight(random_blocks, oracle, GGMLType.Q4_K, 16, 2, seed=1)
    wv, v_ref = _weight(random_blocks, oracle, GGMLType.Q6_K, 8, 2, seed=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(wq.n_cols, generator=gen)
    oq, ov = torch.full((16,), float("nan")), torch.full((8,), float("nan"))
    emulate([wq, wv], x, [oq, ov])
    assert _rel(oq, q_ref @ x.double()) < 1e-5 and _rel(ov, v_ref @ x.double()) < 1e-5
    wu, u_ref = _weight(random_blocks, oracle, GGMLType.Q4_K, 16, 2, seed=4)
    out = torch.full((16,), float("nan"))
    emulate([wq], x, [out], ups=[wu])
    g, u = q_ref @ x.double(), u_ref @ x.double()
    assert _rel(out, g * torch.sigmoid(g) * u) < 1e-5


# --- x [R, K] through the emulation: the rows path's addressing, bit for bit --------------

ROWS = [1, 2, 3, 5, 8, 17]


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_emulation_rows_each_row_as_alone(random_blocks, oracle, t):
    """x [R, K] (row stride padded), outputs and residuals as strided [R, N] views: each row
    bit-identical to the 1-row emulation of x[r] alone, at every R and place (the emulation
    runs the kernel's arithmetic in its order, through the rows kernel's row addressing);
    and near libggml's dequantization times x in float64."""
    _cuda_lib()
    from gguflm.quant.cuda.gemv import emulate

    bpr = 2 if LAYOUTS[t].block_size == 256 else 16
    w, ref = _weight(random_blocks, oracle, t, 12, bpr, seed=int(t) + 7)
    wu, u_ref = _weight(random_blocks, oracle, t, 12, bpr, seed=int(t) + 8)
    K, N = w.n_cols, w.n_rows
    gen = torch.Generator().manual_seed(int(t))
    nw = torch.randn(K, generator=gen)
    for R in ROWS:
        x = torch.randn(R, K + 4, generator=gen)[:, :K]                   # row stride K + 4
        res = torch.randn(R, N + 3, generator=gen)[:, 1:N + 1]            # row stride N + 3
        for kind in ("norm", "residual", "swiglu"):
            buf = torch.full((R, N + 5), float("nan"))
            out = buf[:, 2:N + 2]
            kw = {"norm": dict(norm_weight=nw, eps=1e-5), "residual": dict(residuals=[res]),
                  "swiglu": dict(norm_weight=nw, eps=1e-5, ups=[wu])}[kind]
            emulate([w], x, [out], **kw)
            assert torch.isnan(buf[:, :2]).all() and torch.isnan(buf[:, N + 2:]).all(), (R, kind)
            for r in range(R):
                one = torch.full((N,), float("nan"))
                kw1 = dict(kw, residuals=[res[r].clone()]) if kind == "residual" else kw
                emulate([w], x[r].contiguous(), [one], **kw1)
                assert torch.equal(out[r], one), (R, kind, r)
                xd = x[r].double()
                xn = xd / torch.sqrt((xd * xd).mean() + 1e-5) * nw.double()
                want = {"norm": ref @ xn, "residual": res[r].double() + ref @ xd,
                        "swiglu": torch.nn.functional.silu(ref @ xn) * (u_ref @ xn)}[kind]
                assert _rel(out[r], want) < 1e-5, (R, kind, r)


def test_emulation_rows_of_mixed_segments(random_blocks, oracle):
    """Q4_K and Q6_K segments in one call (a QKV buffer [R, total] split along dim 1), and
    Q4_0 with Q8_0: every row of every segment as alone."""
    _cuda_lib()
    from gguflm.quant.cuda.gemv import emulate

    for (ta, tb), bpr in (((GGMLType.Q4_K, GGMLType.Q6_K), 2), ((GGMLType.Q4_0, GGMLType.Q8_0), 16)):
        wq, q_ref = _weight(random_blocks, oracle, ta, 16, bpr, seed=11)
        wk, k_ref = _weight(random_blocks, oracle, ta, 8, bpr, seed=12)
        wv, v_ref = _weight(random_blocks, oracle, tb, 8, bpr, seed=13)
        gen = torch.Generator().manual_seed(14)
        nw = torch.randn(wq.n_cols, generator=gen)
        for R in ROWS:
            x = torch.randn(R, wq.n_cols, generator=gen)
            qkv = torch.full((R, 32), float("nan"))
            outs = list(qkv.split([16, 8, 8], dim=1))
            emulate([wq, wk, wv], x, outs, norm_weight=nw, eps=1e-6)
            for r in range(R):
                ones = [torch.full((n,), float("nan")) for n in (16, 8, 8)]
                emulate([wq, wk, wv], x[r], ones, norm_weight=nw, eps=1e-6)
                xd = x[r].double()
                xn = xd / torch.sqrt((xd * xd).mean() + 1e-6) * nw.double()
                for o, one, ref in zip(outs, ones, (q_ref, k_ref, v_ref)):
                    assert torch.equal(o[r], one), (ta.name, R, r)
                    assert _rel(o[r], ref @ xn) < 1e-5


TILE_ROWS = [1, 2, 3, 8, 17, 32]


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("short", [False, True], ids=["40chunks", "8chunks"])
def test_emulation_tile_each_row_as_alone(random_blocks, oracle, t, short):
    """The tile kernel's order (x [R, K] staged per tile of up to 4 or 8 rows, a short tile
    padded with its last row, the chunk sums once per row, each chunk's codes decoded per 4
    positions and the tail from the weight row's scales): each row bit-identical to the 1-row
    emulation of x[r] alone at every R, place and tile instance (4 and 8 rows), for the
    NORM, residual and SWIGLU epilogues; rows of 40 chunks (8 lanes take two) and of 8 (24
    lanes take none: a small model's rows of 256 values)."""
    _cuda_lib()
    from gguflm.quant.cuda.gemv import emulate

    bpr = (1 if short else 5) if LAYOUTS[t].block_size == 256 else (8 if short else 40)
    w, ref = _weight(random_blocks, oracle, t, 6, bpr, seed=int(t) + 17)
    wu, u_ref = _weight(random_blocks, oracle, t, 6, bpr, seed=int(t) + 18)
    K, N = w.n_cols, w.n_rows
    gen = torch.Generator().manual_seed(int(t) + 1)
    nw = torch.randn(K, generator=gen)
    x_all = torch.randn(max(TILE_ROWS), K + 4, generator=gen)[:, :K]      # row stride K + 4
    res_all = torch.randn(max(TILE_ROWS), N + 3, generator=gen)[:, 1:N + 1]
    alone = {}
    for kind in ("norm", "residual", "swiglu"):
        kw = {"norm": dict(norm_weight=nw, eps=1e-5), "residual": dict(residuals=[res_all]),
              "swiglu": dict(norm_weight=nw, eps=1e-5, ups=[wu])}[kind]
        for r in range(max(TILE_ROWS)):
            one = torch.full((N,), float("nan"))
            kw1 = dict(kw, residuals=[res_all[r].clone()]) if kind == "residual" else kw
            emulate([w], x_all[r].contiguous(), [one], **kw1)
            alone[kind, r] = one
        for R in TILE_ROWS:
            x, res = x_all[:R], res_all[:R]
            for nx in (4, 8, None):
                buf = torch.full((R, N + 5), float("nan"))
                out = buf[:, 2:N + 2]
                kwr = dict(kw, residuals=[res]) if kind == "residual" else kw
                emulate([w], x, [out], kernel="tile", tile_nx=nx, **kwr)
                assert torch.isnan(buf[:, :2]).all() and torch.isnan(buf[:, N + 2:]).all(), (R, kind)
                for r in range(R):
                    assert torch.equal(out[r], alone[kind, r]), (t.name, R, nx, kind, r)
        r = max(TILE_ROWS) - 1
        xd = x_all[r].double()
        xn = xd / torch.sqrt((xd * xd).mean() + 1e-5) * nw.double()
        want = {"norm": ref @ xn, "residual": res_all[r].double() + ref @ xd,
                "swiglu": torch.nn.functional.silu(ref @ xn) * (u_ref @ xn)}[kind]
        assert _rel(alone[kind, r], want) < 1e-5, kind


def test_emulation_tile_of_mixed_segments(random_blocks, oracle):
    """The tile kernel's order over Q4_K + Q6_K and Q4_0 + Q8_0 segments in one call (a QKV
    buffer split along dim 1): every row of every segment as alone."""
    _cuda_lib()
    from gguflm.quant.cuda.gemv import emulate

    for (ta, tb), bpr in (((GGMLType.Q4_K, GGMLType.Q6_K), 2), ((GGMLType.Q4_0, GGMLType.Q8_0), 16)):
        wq, _ = _weight(random_blocks, oracle, ta, 8, bpr, seed=21)
        wk, _ = _weight(random_blocks, oracle, ta, 4, bpr, seed=22)
        wv, _ = _weight(random_blocks, oracle, tb, 4, bpr, seed=23)
        gen = torch.Generator().manual_seed(24)
        nw = torch.randn(wq.n_cols, generator=gen)
        for R in (3, 17):
            x = torch.randn(R, wq.n_cols, generator=gen)
            qkv = torch.full((R, 16), float("nan"))
            outs = list(qkv.split([8, 4, 4], dim=1))
            emulate([wq, wk, wv], x, outs, norm_weight=nw, eps=1e-6, kernel="tile")
            for r in range(R):
                ones = [torch.full((n,), float("nan")) for n in (8, 4, 4)]
                emulate([wq, wk, wv], x[r], ones, norm_weight=nw, eps=1e-6)
                for o, one in zip(outs, ones):
                    assert torch.equal(o[r], one), (ta.name, R, r)


def test_tile_plan():
    """The tile kernel's launch plan: balanced tiles within an instance, the smaller
    instance for few rows, none where no instance fits the shared memory."""
    from gguflm.quant.cuda.gemv import TILE_SMEM_LIMIT, tile_plan, tile_smem

    assert tile_plan(2048, 2) == (4, 2) and tile_plan(2048, 3) == (4, 3) and tile_plan(2048, 4) == (4, 4)
    assert tile_plan(2048, 8) == (8, 8) and tile_plan(2048, 32) == (8, 8) and tile_plan(5632, 17)[1] <= 8
    for n_x in range(1, 70):
        nx, tile = tile_plan(2048, n_x)
        tiles = -(-n_x // tile)
        assert 1 <= tile <= nx and tiles == -(-n_x // nx)                   # as few tiles as the instance allows
        assert tiles * tile - n_x < tiles                                    # balanced: < 1 padded row per tile
    assert tile_smem(5632, 8) <= TILE_SMEM_LIMIT and tile_plan(5632, 32) == (8, 8) and tile_plan(20000, 5) is None


def test_rows_library_builds_for_sm_90():
    """The rows kernels' library (build.py kind "rows", parts of gemv.cu of its own) compiles
    for sm_90 offline and agrees with the ctypes mirror of Params; the 1-row library keeps
    its parts."""
    from gguflm.quant.cuda import build
    from gguflm.quant.cuda.gemv import _Params

    if build.nvcc() is None:
        pytest.skip("nvcc is not available")
    assert not set(build.PARTS["gemv"]) & set(build.PARTS["rows"]) and 0 in build.PARTS["gemv"]
    assert build._name("sm_90", "rows") != build._name("sm_90")
    lib = build.library("sm_90", "rows")
    assert lib.gguflm_rows_params_size() == ctypes.sizeof(_Params)
    assert hasattr(lib, "gguflm_gemv_rows") and hasattr(lib, "gguflm_gemv_tile")
    assert not hasattr(lib, "gguflm_gemv_emulate")


# --- on the GPU: the kernels themselves against the torch twins ---------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels run on a GPU only")


def _instances():
    from gguflm.quant.cuda.gemv import INSTANCES, CudaGemvConfig

    return [CudaGemvConfig(r, u, w) for r, u in sorted(INSTANCES) for w in (1, 4, 8)]


@gpu
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("bpr", [1, 5, 8, 22])
def test_kernel_matches_the_twin(random_blocks, t, bpr):
    """Every built launch shape, ragged rows (37) and row lengths from 1 to 22 K-blocks;
    outputs poisoned first; a second run is bit-identical."""
    _cuda_lib()
    from gguflm.quant.cuda.gemv import launch

    qk = LAYOUTS[t].block_size
    bpr = bpr * 256 // qk
    raw = random_blocks(t, 40 * bpr, seed=bpr + int(t))
    w = PackedWeight.from_raw(raw, t, (bpr * qk, 40), "cuda")
    gen = torch.Generator().manual_seed(bpr)
    x, nw, r = (torch.randn(n, generator=gen).cuda() for n in (w.n_cols, w.n_cols, w.n_rows))
    want = gemv_reference(w, x, norm_weight=nw, eps=1e-5).cpu()
    want_r = gemv_reference(w, x, residual=r).cpu()
    for cfg in _instances():
        out = torch.full((w.n_rows,), float("nan"), device="cuda")
        launch([w], x, [out], norm_weight=nw, eps=1e-5, config=cfg)
        assert _rel(out, want) < 1e-5, cfg
        again = torch.full_like(out, float("nan"))
        launch([w], x, [again], norm_weight=nw, eps=1e-5, config=cfg)
        assert torch.equal(out, again), cfg
        res = r.clone()
        launch([w], x, [res], residuals=[res], config=cfg)                # in place
        assert _rel(res, want_r) < 1e-5, cfg


@gpu
def test_kernel_segments_and_swiglu(random_blocks):
    _cuda_lib()
    from gguflm.quant.cuda.gemv import gemv_multi, gemv_swiglu

    def w_(t, rows, seed):
        qk = LAYOUTS[t].block_size
        return PackedWeight.from_raw(random_blocks(t, rows * 2048 // qk, seed), t, (2048, rows), "cuda")

    gen = torch.Generator().manual_seed(0)
    x, nw = (torch.randn(2048, generator=gen).cuda() for _ in range(2))
    for ws in ([w_(GGMLType.Q4_K, 256, 1), w_(GGMLType.Q4_K, 40, 2), w_(GGMLType.Q6_K, 40, 3)],
               [w_(GGMLType.Q4_0, 64, 1), w_(GGMLType.Q8_0, 40, 2), w_(GGMLType.Q4_0, 8, 3)]):
        outs = [torch.full((w.n_rows,), float("nan"), device="cuda") for w in ws]
        gemv_multi(ws, x, outs, norm_weight=nw, eps=1e-6)                  # one launch, two types
        for w, o in zip(ws, outs):
            assert _rel(o, gemv_reference(w, x, norm_weight=nw, eps=1e-6).cpu()) < 1e-5
    for t in (GGMLType.Q4_K, GGMLType.Q4_0, GGMLType.Q6_K):
        wg, wu = w_(t, 300, 5), w_(t, 300, 6)
        y = gemv_swiglu(wg, wu, x, norm_weight=nw, eps=1e-6)
        assert _rel(y, gemv_swiglu_reference(wg, wu, x, norm_weight=nw, eps=1e-6).cpu()) < 1e-5


@gpu
def test_argmax_epilogue_is_torch_argmax(random_blocks):
    """The fused argmax picks torch.argmax's index (ties: the first), replay after replay."""
    _cuda_lib()
    from gguflm.quant.cuda.gemv import ArgmaxWorkspace, CudaGemvConfig, launch

    ws = ArgmaxWorkspace(torch.device("cuda"))
    for t, rows in ((GGMLType.Q6_K, 5000), (GGMLType.Q4_0, 77)):
        qk = LAYOUTS[t].block_size
        w = PackedWeight.from_raw(random_blocks(t, rows * 2048 // qk, rows), t, (2048, rows), "cuda")
        gen = torch.Generator().manual_seed(rows)
        for x in (torch.randn(2048, generator=gen).cuda(), torch.zeros(2048, device="cuda")):
            for cfg in (CudaGemvConfig(1, 2, 4), CudaGemvConfig(2, 1, 8)):
                for _ in range(2):
                    am = torch.full((1,), -1, dtype=torch.int64, device="cuda")
                    out = torch.empty(rows, device="cuda")
                    launch([w], x, [out], config=cfg, argmax=(am, ws))
                    assert int(am) == int(torch.argmax(out))
                    assert int(ws.counter) == 0


# --- x [R, K]: every row bit-identical to its call alone ---------------------------------

def test_rows_api_each_row_as_alone(packed_weight, device):
    """gemv / gemv_multi / gemv_swiglu with x [R, K] and strided [R, N] outputs and residuals
    (whatever kernel runs here): row r is bit-identical to the 1-row call with x[r], and near
    the float64 product of libggml's dequantization."""
    from gguflm.quant.cuda.gemv import gemv, gemv_multi, gemv_swiglu

    wq, q_ref = packed_weight(GGMLType.Q4_K, 16, 1, seed=1)
    wk, k_ref = packed_weight(GGMLType.Q4_K, 8, 1, seed=2)
    wu, u_ref = packed_weight(GGMLType.Q4_K, 16, 1, seed=3)
    gen = torch.Generator().manual_seed(5)
    R = 3
    x = torch.randn(R, wq.n_cols, generator=gen).to(device)
    nw = torch.randn(wq.n_cols, generator=gen).to(device)
    buf = torch.full((R, 16 + 8 + 5), float("nan"), device=device)      # QKV-like: strided views
    q, k = buf[:, :16], buf[:, 16:24]
    gemv_multi([wq, wk], x, [q, k], norm_weight=nw, eps=1e-5)
    res = torch.randn(R, 40, generator=gen).to(device)[:, 3:19]           # row stride 40
    want_res = res.clone()
    gemv(wq, x, res, residual=res)
    y = gemv_swiglu(wq, wu, x, norm_weight=nw, eps=1e-5)
    for r in range(R):
        q1, k1 = torch.empty(16, device=device), torch.empty(8, device=device)
        gemv_multi([wq, wk], x[r], [q1, k1], norm_weight=nw, eps=1e-5)
        assert torch.equal(q[r], q1) and torch.equal(k[r], k1)
        assert torch.equal(res[r], gemv(wq, x[r], residual=want_res[r].clone()))
        assert torch.equal(y[r], gemv_swiglu(wq, wu, x[r], norm_weight=nw, eps=1e-5))
        xd = x[r].double().cpu()
        assert _rel(res[r], want_res[r].double().cpu() + q_ref @ xd) < 1e-5
    assert torch.isnan(buf[:, 24:]).all()                                 # nothing written past the views


GPU_ROWS = [1, 2, 3, 8, 17, 32, 64]


@gpu
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("bpr", [2, 8, 22])
@pytest.mark.parametrize("rw", [1, 2, "tile"])
def test_rows_kernel_each_row_as_alone(random_blocks, t, bpr, rw):
    """The rows kernels (x [R, K], strided outputs/residuals; the warp kernel with 1 and 2
    weight rows per warp, the tile kernel) against R launches of the 1-row kernel on x[r]:
    bit-identical at every R and place, run to run, for the plain, NORM, residual (in place)
    and SWIGLU epilogues, with the launch shapes the model uses (K = 2048: 4 warps, K = 5632:
    8 warps); and near the float64 twin."""
    _cuda_lib()
    from gguflm.quant.cuda.gemv import launch

    qk = LAYOUTS[t].block_size
    bpr = bpr * 256 // qk
    n = 75                                                                 # ragged: 75 weight rows
    w = PackedWeight.from_raw(random_blocks(t, n * bpr, seed=bpr + int(t)), t, (bpr * qk, n), "cuda")
    wu = PackedWeight.from_raw(random_blocks(t, n * bpr, seed=bpr + int(t) + 1), t, (bpr * qk, n), "cuda")
    K = w.n_cols
    gen = torch.Generator().manual_seed(bpr)
    nw = torch.randn(K, generator=gen).cuda()
    variant = dict(kernel="tile") if rw == "tile" else dict(kernel="warp", rows_rw=rw)
    other = dict(kernel="tile", tile_nx=4, tile_groups_=2) if rw == "tile" else dict(variant, rows_tile_=3)
    for R in GPU_ROWS:
        x = torch.randn(R, K + 8, generator=gen).cuda()[:, 4:K + 4]          # row stride K + 8
        res0 = torch.randn(R, n + 7, generator=gen).cuda()
        for kind in ("plain", "norm", "residual", "swiglu"):
            kw = {"plain": {}, "norm": dict(norm_weight=nw, eps=1e-5), "residual": {},
                  "swiglu": dict(norm_weight=nw, eps=1e-5, ups=[wu])}[kind]
            got = []
            for _ in range(2):
                buf = res0.clone()
                out = buf[:, 3:n + 3]
                if kind != "residual":
                    buf.fill_(float("nan"))
                launch([w], x, [out], residuals=[out] if kind == "residual" else None, **variant, **kw)
                got.append(buf)
            assert torch.equal(got[0].nan_to_num(7.0), got[1].nan_to_num(7.0)), (R, kind)   # run to run (NaN: untouched)
            if R == 17:                                          # another tile of x rows (groups per CTA)
                buf = res0.clone()
                out = buf[:, 3:n + 3]
                if kind != "residual":
                    buf.fill_(float("nan"))
                launch([w], x, [out], residuals=[out] if kind == "residual" else None, **other, **kw)
                assert torch.equal(buf.nan_to_num(7.0), got[0].nan_to_num(7.0)), kind
            if kind != "residual":
                assert torch.isnan(got[0][:, :3]).all() and torch.isnan(got[0][:, n + 3:]).all()
            for r in range(R):
                one = res0[r, 3:n + 3].clone() if kind == "residual" else torch.full((n,), float("nan"), device="cuda")
                launch([w], x[r].contiguous(), [one], residuals=[one] if kind == "residual" else None, **kw)
                assert torch.equal(got[0][r, 3:n + 3], one), (t.name, K, R, kind, r)
            r = R - 1
            if kind == "swiglu":
                want = gemv_swiglu_reference(w, wu, x[r].contiguous(), norm_weight=nw, eps=1e-5)
            else:
                want = gemv_reference(w, x[r].contiguous(), norm_weight=kw.get("norm_weight"), eps=1e-5 if kw else 0.0,
                                      residual=res0[r, 3:n + 3] if kind == "residual" else None)
            assert _rel(got[0][r, 3:n + 3], want.cpu()) < 1e-5, (R, kind)


@gpu
def test_rows_api_segments_on_the_gpu(random_blocks):
    """gemv_multi over a QKV buffer [R, total] split along dim 1 (Q4_K + Q6_K, Q4_0 + Q8_0),
    gemv_swiglu and gemv with an in-place residual of row stride != N, through the public
    API at the TinyLlama shapes: each row bit-identical to the 1-row call (generate()'s)."""
    _cuda_lib()
    from gguflm.quant.cuda.gemv import gemv, gemv_multi, gemv_swiglu

    def w_(t, rows, cols, seed):
        qk = LAYOUTS[t].block_size
        return PackedWeight.from_raw(random_blocks(t, rows * cols // qk, seed), t, (cols, rows), "cuda")

    gen = torch.Generator().manual_seed(0)
    nw = torch.randn(2048, generator=gen).cuda()
    for R in (2, 5, 32):
        x = torch.randn(R, 2048, generator=gen).cuda()
        for ws in ([w_(GGMLType.Q4_K, 256, 2048, 1), w_(GGMLType.Q4_K, 64, 2048, 2), w_(GGMLType.Q6_K, 64, 2048, 3)],
                   [w_(GGMLType.Q4_0, 256, 2048, 1), w_(GGMLType.Q4_0, 64, 2048, 2), w_(GGMLType.Q8_0, 64, 2048, 3)]):
            qkv = torch.full((R, 384), float("nan"), device="cuda")
            outs = list(qkv.split([256, 64, 64], dim=1))
            gemv_multi(ws, x, outs, norm_weight=nw, eps=1e-6)
            for r in range(R):
                ones = [torch.empty(w.n_rows, device="cuda") for w in ws]
                gemv_multi(ws, x[r], ones, norm_weight=nw, eps=1e-6)
                assert all(torch.equal(o[r], one) for o, one in zip(outs, ones)), (R, r)
        wg, wu = w_(GGMLType.Q4_K, 704, 2048, 5), w_(GGMLType.Q4_K, 704, 2048, 6)
        y = gemv_swiglu(wg, wu, x, norm_weight=nw, eps=1e-6)
        a = torch.randn(R, 5632, generator=gen).cuda()
        wd = w_(GGMLType.Q6_K, 2048, 5632, 7)
        h0 = torch.randn(R, 2100, generator=gen).cuda()
        h = h0.clone()
        gemv(wd, a, h[:, :2048], residual=h[:, :2048])
        for r in range(R):
            assert torch.equal(y[r], gemv_swiglu(wg, wu, x[r], norm_weight=nw, eps=1e-6)), (R, r)
            assert torch.equal(h[r, :2048], gemv(wd, a[r], residual=h0[r, :2048].clone())), (R, r)
        assert torch.equal(h[:, 2048:], h0[:, 2048:])
