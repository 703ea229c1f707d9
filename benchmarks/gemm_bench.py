"""The fused dequantize x GEMM (quant/triton/gemm.py) against the path it replaces (tile
dequantization into float16 + cuBLAS) and, at M = 1, the batch-1 GEMV, on the weight
shapes of the TinyLlama-1.1B files (random blocks, llama.cpp's Q4_K_M / Q4_0 types).

Each figure is the median of CUDA-graph replays over enough copies of the weight to
spill the L2 (every launch reads its weight from HBM), per launch, in microseconds. For a
weight that :func:`gemm_config` splits along K, the same launch without split-K too.

    python benchmarks/gemm_bench.py [--m 1,2,8,16,32,64,128,256,512] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np
import torch
import triton

from gguflm.gguf.types import LAYOUTS, GGMLType
from gguflm.quant.triton.dequant import dequantize_into
from gguflm.quant.triton.gemm import GemmConfig, gemm, gemm_config, gemm_gated
from gguflm.quant.triton.planes import PackedWeight

SHAPES = [  # name, type, rows, cols, swiglu
    ("qkv", GGMLType.Q4_K, 2560, 2048, False),
    ("o", GGMLType.Q4_K, 2048, 2048, False),
    ("gate+up", GGMLType.Q4_K, 5632, 2048, True),
    ("down", GGMLType.Q4_K, 2048, 5632, False),
    ("down", GGMLType.Q6_K, 2048, 5632, False),
    ("v", GGMLType.Q6_K, 256, 2048, False),
    ("output", GGMLType.Q6_K, 32000, 2048, False),
    ("qkv", GGMLType.Q4_0, 2560, 2048, False),
    ("gate+up", GGMLType.Q4_0, 5632, 2048, True),
    ("down", GGMLType.Q4_0, 2048, 5632, False),
]
L2_SPILL = 160 * 2**20


def random_weight(t: GGMLType, rows: int, cols: int, seed: int) -> PackedWeight:
    lay = LAYOUTS[t]
    n = rows * cols // lay.block_size
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(n, lay.type_size), dtype=np.uint8)
    for f in lay.fields:
        if f.dtype == "<f2":
            off = lay.offsets[f.name]
            b[:, off:off + f.nbytes] = (rng.standard_normal((n, f.count)) * 0.002).astype(np.float16).view(np.uint8)
    return PackedWeight.from_raw(b, t, (cols, rows), "cuda")


def graph_us(fn_per_copy, copies: int) -> float:
    """Median per-launch time of a graph that runs fn_per_copy(i) for each copy i."""
    for i in range(copies):
        fn_per_copy(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn_per_copy(i)
    ms = triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")
    return ms * 1e3 / copies


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--m", default="1,2,8,16,32,64,128,256,512")
    p.add_argument("--json")
    p.add_argument("--alt", action="store_true",
                   help="also 32-row programs (mma.sync) at every M, and 128 rows / 3 / 1 stages at M >= 128")
    a = p.parse_args(argv)
    ms = [int(v) for v in a.m.split(",")]
    rows_out = []
    ws = torch.empty(32000 * 2048, dtype=torch.float16, device="cuda")
    print(f"{'shape':<22} {'M':>4} {'gemm':>9} {'deq+cublas':>11} {'ratio':>6}  {'GB/s gemm':>9}  alt")
    for name, t, rows, cols, swiglu in SHAPES:
        w0 = random_weight(t, rows, cols, 0)
        nbytes = w0.nbytes * (2 if swiglu else 1)
        copies = max(2, min(16, -(-L2_SPILL // nbytes)))
        ws_list = [w0] + [PackedWeight(w0.ggml_type, rows, cols, w0.planes.clone()) for _ in range(copies - 1)]
        us_list = [PackedWeight(w0.ggml_type, rows, cols, w0.planes.clone()) for _ in range(copies)] if swiglu else None
        for m in ms:
            x = (torch.randn(m, cols, device="cuda") * 0.5).half()
            if swiglu:
                run = lambda i: gemm_gated(ws_list[i], us_list[i], x)  # noqa: E731
            else:
                run = lambda i: gemm(ws_list[i], x)  # noqa: E731
            t_gemm = graph_us(run, copies)
            alt = ""
            base = gemm_config(w0)
            if base.splits > 1:  # the same launch shape without split-K (other bits: for timing only)
                one = dataclasses.replace(base, splits=1)
                if swiglu:
                    f1 = lambda i: gemm_gated(ws_list[i], us_list[i], x, config=one)  # noqa: E731
                else:
                    f1 = lambda i: gemm(ws_list[i], x, config=one)  # noqa: E731
                alt += f" split-K {base.splits}: unsplit {graph_us(f1, copies):.1f}"

            def cublas(i):
                y = torch.nn.functional.linear(x, dequantize_into(ws_list[i], ws[:rows * cols].view(rows, cols)))
                if swiglu:
                    u = torch.nn.functional.linear(x, dequantize_into(us_list[i], ws[:rows * cols].view(rows, cols)))
                    y = torch.nn.functional.silu(y) * u
                return y
            t_cub = graph_us(cublas, copies)
            if a.alt:  # 32 weight rows per program: mma.sync instead of the warp-group MMA, 4x the programs
                small = GemmConfig(32, base.bb, 4, base.num_stages, base.max_block_m)
                if swiglu:
                    f = lambda i: gemm_gated(ws_list[i], us_list[i], x, config=small)  # noqa: E731
                else:
                    f = lambda i: gemm(ws_list[i], x, config=small)  # noqa: E731
                same = torch.equal(f(0), run(0))  # same bits from the two MMA families? (batch invariance across them)
                alt += f" 32/4w(mma.sync) {graph_us(f, copies):.1f} same_bits={same}"
            if a.alt and m >= 128:
                for cfg in (GemmConfig(128, base.bb, 8, 2), GemmConfig(64, base.bb, 8, 3),
                            GemmConfig(64, base.bb, 8, 1)):
                    if swiglu:
                        f = lambda i, c=cfg: gemm_gated(ws_list[i], us_list[i], x, config=c)  # noqa: E731
                    else:
                        f = lambda i, c=cfg: gemm(ws_list[i], x, config=c)  # noqa: E731
                    alt += f" {cfg.block_n}/{cfg.num_warps}w/{cfg.num_stages}s {graph_us(f, copies):.1f}"
            label = f"{name} {t.name} {rows}x{cols}"
            print(f"{label:<22} {m:>4} {t_gemm:9.1f} {t_cub:11.1f} {t_cub / t_gemm:6.2f}  "
                  f"{nbytes / t_gemm / 1e3:9.0f} {alt}", flush=True)
            rows_out.append(dict(shape=label, m=m, gemm_us=t_gemm, dequant_cublas_us=t_cub, alt=alt))
        if not swiglu:  # the batch-1 GEMV (CUDA C++ where it applies) for comparison
            from gguflm.quant.cuda.gemv import gemv
            xv = torch.randn(cols, device="cuda")
            outv = torch.empty(rows, device="cuda")
            t_gemv = graph_us(lambda i: gemv(ws_list[i], xv, outv), copies)
            print(f"{'':<22} gemv(M=1) {t_gemv:.1f} us", flush=True)
            rows_out.append(dict(shape=f"{name} {t.name} {rows}x{cols}", m=1, gemv_us=t_gemv))
        del ws_list, us_list
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows_out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
