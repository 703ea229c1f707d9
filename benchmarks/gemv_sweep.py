"""Achieved memory bandwidth of the fused dequantize x GEMV kernels on the decode shapes
of TinyLlama-1.1B, for a few launch shapes (rows per program, blocks per step, warps).

Weights are random valid blocks, rotated over enough copies to spill the L2 cache, so a
run reads them from HBM as a decode step does. Times are medians of
``triton.testing.do_bench``; GB/s counts the weight bytes once (the activations are
L2-resident and small). Prints one line per (kernel, type, shape, config).

    python benchmarks/gemv_sweep.py [--types Q4_K Q6_K Q4_0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from gguflm.gguf.types import LAYOUTS, GGMLType
from gguflm.quant.triton.gemv import GemvConfig, gemv, gemv_config, gemv_swiglu
from gguflm.quant.triton.planes import PackedWeight

SHAPES = {  # name: (rows, cols, kernel)
    "qkv": (2560, 2048, "norm"),
    "o": (2048, 2048, "residual"),
    "gate_up": (5632, 2048, "swiglu"),
    "down": (2048, 5632, "residual"),
    "output": (32000, 2048, "norm"),
}
CONFIGS = {  # block size -> (rows per program, blocks per step, warps)
    256: [(4, 2, 4), (4, 8, 4), (4, 4, 2), (2, 4, 2), (8, 2, 4), (8, 4, 4), (16, 1, 4)],
    32: [(4, 16, 4), (4, 64, 4), (4, 32, 2), (2, 32, 2), (8, 16, 4), (8, 32, 4), (16, 8, 4)],
}


def random_weight(t: GGMLType, rows: int, cols: int, rng: np.random.Generator) -> PackedWeight:
    lay = LAYOUTS[t]
    n = rows * cols // lay.block_size
    b = rng.integers(0, 256, size=(n, lay.type_size), dtype=np.uint8)
    for f in lay.fields:
        if f.dtype == "<f2":
            off = lay.offsets[f.name]
            v = (rng.standard_normal((n, f.count)) * 0.02).astype(np.float16)
            b[:, off:off + f.nbytes] = v.view(np.uint8).reshape(n, -1)
    return PackedWeight.from_raw(b, t, (cols, rows), "cuda")


def main(argv: list[str] | None = None) -> int:
    import triton.testing

    p = argparse.ArgumentParser()
    p.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K", "Q4_0"])
    p.add_argument("--json")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    results = []
    for tname in a.types:
        t = GGMLType[tname]
        qk = LAYOUTS[t].block_size
        for shape, (rows, cols, kind) in SHAPES.items():
            n_copies = max(2, int(120e6 // (rows * cols * LAYOUTS[t].type_size / qk)) + 1)
            ws = [random_weight(t, rows, cols, rng) for _ in range(min(n_copies, 16))]
            wus = [random_weight(t, rows, cols, rng) for _ in range(len(ws))] if kind == "swiglu" else None
            x = torch.randn(cols, device="cuda")
            nw = torch.randn(cols, device="cuda")
            out = torch.zeros(rows, device="cuda")
            nbytes = ws[0].nbytes * (2 if kind == "swiglu" else 1)
            configs = [None] + [GemvConfig(bn, bb, nw_) for bn, bb, nw_ in CONFIGS[qk]]
            for cfg in configs:
                state = {"i": 0}

                def call() -> None:
                    i = state["i"] = (state["i"] + 1) % len(ws)
                    if kind == "swiglu":
                        gemv_swiglu(ws[i], wus[i], x, out, norm_weight=nw, eps=1e-5, config=cfg)
                    elif kind == "norm":
                        gemv(ws[i], x, out, norm_weight=nw, eps=1e-5, config=cfg)
                    else:
                        gemv(ws[i], x, out, residual=out, config=cfg)

                try:
                    ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
                except Exception as e:  # a launch shape the compiler rejects: report, go on
                    print(f"{kind:8s} {tname:5s} {shape:8s} {cfg} failed: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                used = cfg or gemv_config(ws[0])
                row = {"kind": kind, "type": tname, "shape": shape, "rows": rows, "cols": cols,
                       "block_n": used.block_n, "bb": used.bb, "warps": used.num_warps, "default": cfg is None,
                       "us": ms * 1e3, "gbps": nbytes / (ms * 1e-3) / 1e9}
                results.append(row)
                print(f"{kind:8s} {tname:5s} {shape:8s} bn={used.block_n:2d} bb={used.bb:2d} w={used.num_warps} "
                      f"{'(default)' if cfg is None else '         '} {ms * 1e3:8.1f} us {row['gbps']:7.0f} GB/s",
                      flush=True)
            del ws, wus
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
