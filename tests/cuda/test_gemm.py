"""The fused dequantize x GEMM (quant/triton/gemm.py) against libggml's dequantizers
(``to_float``, rounded to float16: the kernel's operand) times a float64 matmul, and its
batch invariance: a row of X gives the same bits at any M, anywhere in the batch, with
any BLOCK_M, with its runs of K (split-K) in programs of their own or in turn. Runs on
the GPU, or in Triton's interpreter on the CPU (small shapes: the weights here have 2-3
tiles of 64 rows and 3 K steps, so :func:`gemm_config` splits K in 3)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gguflm.gguf.types import LAYOUTS, GGMLType
from gguflm.quant.triton.codecs import CODECS
from gguflm.quant.triton.gemm import block_m, gemm, gemm_config, gemm_gated, gemm_gated_reference, gemm_reference
from gguflm.quant.triton.planes import PackedWeight

FUSED = sorted(CODECS)  # every registered block decoder


@pytest.fixture
def weight(packed_weight):
    """``packed_weight`` with libggml's value rounded to float16 (the kernel's operand)."""
    def make(*args, **kw):
        w, ref = packed_weight(*args, **kw)
        return w, ref.half().double()

    return make


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b).abs().max() / b.abs().max())


def _blocks_per_row(t: GGMLType) -> int:
    # a ragged last K step: one block more than a whole number of steps (2 steps + 1 block)
    bb = max(1, 256 // LAYOUTS[t].block_size)
    return 2 * bb + 1


@pytest.mark.parametrize("t", FUSED, ids=lambda t: t.name)
def _splits(w: PackedWeight, n: int):
    """``w``'s launch shape with K cut into ``n`` runs."""
    return dataclasses.replace(gemm_config(w), splits=n)


@pytest.mark.parametrize("t", FUSED, ids=lambda t: t.name)
def test_gemm_matches_libggml(weight, device, t):
    # 70 weight rows over 64-row programs, 5 activation rows in a 16-row tile; K in 3 runs
    # (partials and their reduction), in turn in one program, and in one run
    w, ref = weight(t, 70, _blocks_per_row(t), seed=int(t))
    assert gemm_config(w).splits == 3
    x = torch.randn(5, w.n_cols, generator=torch.Generator().manual_seed(int(t))).half()
    want = x.double() @ ref.T
    y = gemm(w, x.to(device), out_dtype=torch.float32)
    assert y.shape == (5, 70) and y.dtype == torch.float32
    assert _rel(y, want) < 2e-5
    assert torch.equal(gemm(w, x.to(device), out_dtype=torch.float32, parallel=False), y)
    assert _rel(gemm(w, x.to(device), out_dtype=torch.float32, config=_splits(w, 1)), want) < 2e-5
    assert _rel(gemm(w, x.to(device)), want) < 1e-3                                   # float16 output
    assert _rel(gemm_reference(w, x.to(device)), want) < 1e-12                        # the twin, same oracle


@pytest.mark.parametrize("t,gelu", [(GGMLType.Q4_K, False), (GGMLType.Q4_0, False), (GGMLType.Q6_K, True)],
                         ids=["Q4_K-silu", "Q4_0-silu", "Q6_K-gelu"])
def test_gemm_gated_matches_libggml(weight, device, t, gelu):
    wg, g_ref = weight(t, 66, _blocks_per_row(t), seed=1)
    wu, u_ref = weight(t, 66, _blocks_per_row(t), seed=2)
    x = (torch.randn(19, wg.n_cols, generator=torch.Generator().manual_seed(3)) / 64).half()  # |y| << 65504
    g, u = x.double() @ g_ref.T, x.double() @ u_ref.T
    act = torch.nn.functional.gelu(g, approximate="tanh") if gelu else torch.nn.functional.silu(g)
    want = act * u
    y = gemm_gated(wg, wu, x.to(device), gelu=gelu)                                   # K in 3 runs
    assert _rel(y, want) < 2e-3
    assert torch.equal(gemm_gated(wg, wu, x.to(device), gelu=gelu, parallel=False), y)
    assert _rel(gemm_gated(wg, wu, x.to(device), gelu=gelu, config=_splits(wg, 1)), want) < 2e-3
    assert _rel(gemm_gated_reference(wg, wu, x.to(device), gelu=gelu), want) < 1e-12


def test_gemm_bias_into_a_column_slice(weight, device):
    t = GGMLType.Q6_K
    w, ref = weight(t, 33, 2, seed=5)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, w.n_cols, generator=gen).half()
    b = torch.randn(33, generator=gen)
    want = x.double() @ ref.T + b.double()
    for splits in (1, 2):                                  # the bias in the GEMM's epilogue, in the reduction's
        buf = torch.full((7, 50), -7.0, device=device)
        gemm(w, x.to(device), buf[:, 10:43], bias=b.to(device), config=_splits(w, splits))
        assert _rel(buf[:, 10:43], want) < 2e-5
        assert bool((buf[:, :10] == -7).all()) and bool((buf[:, 43:] == -7).all())   # nothing else written


@pytest.mark.parametrize("t,splits", [(GGMLType.Q4_K, 3), (GGMLType.Q6_K, 3), (GGMLType.Q4_0, 1)],
                         ids=["Q4_K", "Q6_K", "Q4_0-unsplit"])
def test_gemm_is_batch_invariant(weight, device, t, splits):
    """Row ``probe`` of X gives bit-identical outputs (plain and gated) alone and among
    3, 17 and 64 rows, at the start, in the middle and at the end of the batch, whatever
    the other rows hold, under every BLOCK_M, and with K's runs in programs of their own
    (partials, as for M <= 64) or added in turn in one program (as for more rows)."""
    w, _ = weight(t, 130, _blocks_per_row(t), seed=9)
    cfg = _splits(w, splits)
    gen = torch.Generator().manual_seed(9)
    rows = lambda m: (torch.randn(m, w.n_cols, generator=gen) / 64).half().to(device)  # noqa: E731 (finite gated products)
    probe = rows(1)
    alone = gemm(w, probe, config=cfg)
    alone_g = gemm_gated(w, w, probe, config=cfg)
    assert torch.equal(gemm(w, probe, config=cfg, parallel=False), alone)
    for m, places in ((1, [0]), (3, [2]), (17, [8]), (64, [0, 63])):
        for where in places:
            x = rows(m)
            x[where] = probe[0]
            assert torch.equal(gemm(w, x, config=cfg)[where], alone[0]), (m, where, block_m(m))
            assert torch.equal(gemm_gated(w, w, x, config=cfg)[where], alone_g[0]), (m, where)
    x = rows(40)
    x[21] = probe[0]
    for bm in (16, 32, 64, 128):
        assert torch.equal(gemm(w, x, config=cfg, bm=bm, parallel=bm < 64)[21], alone[0]), bm
    assert torch.equal(gemm_gated(w, w, x, config=cfg, parallel=False)[21], alone_g[0])


def test_gemm_partials_in_row_chunks(weight, device, monkeypatch):
    """Rows past PARTIAL_ROWS take another launch of the partials path: the same bits."""
    from gguflm.quant.triton import gemm as G

    w, _ = weight(GGMLType.Q4_K, 66, _blocks_per_row(GGMLType.Q4_K), seed=4)
    x = (torch.randn(20, w.n_cols, generator=torch.Generator().manual_seed(4)) / 64).half().to(device)
    whole, whole_g = gemm(w, x), gemm_gated(w, w, x)
    monkeypatch.setattr(G, "PARTIAL_ROWS", 8)
    assert torch.equal(gemm(w, x), whole) and torch.equal(gemm_gated(w, w, x), whole_g)


def test_gemm_refuses_what_it_cannot_run(random_blocks, device):
    w = PackedWeight.from_raw(random_blocks(GGMLType.Q4_0, 8, 0), GGMLType.Q4_0, (64, 4), device)
    with pytest.raises(ValueError, match="float16"):
        gemm(w, torch.randn(2, 64, device=device))                                     # float32 activations
    with pytest.raises(ValueError, match="out must be"):
        gemm(w, torch.randn(2, 64, device=device).half(), torch.empty(2, 5, device=device))
    f16 = PackedWeight(GGMLType.F16, 4, 64, torch.zeros(512, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match="F16"):
        gemm(f16, torch.randn(2, 64, device=device).half())
