"""The CUDA C++ GEMVs over R activation rows (gguflm/quant/cuda/gemv.cu: gemv_tile_kernel,
the default, and gemv_rows_kernel, "warp") against R launches of the 1-row kernel and the
split-K fused Triton GEMM
(gguflm/quant/triton/gemm.py, what the batched step runs today) at the same R, on the
TinyLlama-1.1B decode shapes of the Q4_K_M and Q4_0 mixes (random weights of those types
and shapes, made on the GPU), in one device call.

First a check: at every R each rows kernel's row r is bit-identical to the 1-row kernel on
x[r] (the contract; tests/cuda/test_cuda_gemv.py has the full one). Then, per shape and R in
--rows: one launch's time (a CUDA graph of launches over enough weight copies to spill the
L2 cache, replayed; median of 5; cuda_gemv_bench.graph_us), for the --kernels of:
``tile`` (gemv_tile_kernel, its default plan: gemv.tile_plan, tile_groups), ``tile4`` /
``tile8`` (its instance of 4 / 8 rows of x per tile), ``tile_g1`` / ``tile_g4`` (1 / 4 groups
of weight rows per CTA), ``rw1`` / ``rw2`` (gemv_rows_kernel, one
or two weight rows per warp; from 8 rows also ``rw2_tile4/8``, the other tile of x rows per
CTA); R = 1 runs the 1-row kernel for all of them; ``gemm`` (x float16 [R, K], split-K GEMM
+ reduction, the gated GEMM for gate/up) and, for R <= 8, ``loop`` (R 1-row launches). At
the end, per kernel and R, the sum over one TinyLlama Q4_K_M decode step's matmuls (22
layers x (qkv + o + gate_up + down) + output), the figure of benchmarks/cuda_notes.md.

    python benchmarks/cuda_gemv_rows_bench.py --out DIR [--rows 1,2,4,8,16,32,64] [--kernels tile,rw2,gemm]
        [--only-q4km] [--no-check]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_gemv_bench import graph_us, weight  # noqa: E402  (random planes on the GPU, graph timing)

from gguflm.gguf.types import LAYOUTS, GGMLType  # noqa: E402
from gguflm.quant.cuda import gemv as cg  # noqa: E402
from gguflm.quant.triton import gemm as tgemm  # noqa: E402

Q4_K, Q6_K, Q4_0, Q8_0 = GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q4_0, GGMLType.Q8_0
E, F, KV, VOCAB = 2048, 5632, 256, 32000
CASES = [  # name, kind, segments [(type, rows)], cols
    ("qkv", "norm", [(Q4_K, E), (Q4_K, KV), (Q6_K, KV)], E),
    ("o", "residual", [(Q4_K, E)], E),
    ("gate_up", "swiglu", [(Q4_K, F)], E),
    ("down", "residual", [(Q6_K, E)], F),
    ("output", "norm", [(Q6_K, VOCAB)], E),
    ("qkv", "norm", [(Q4_0, E + 2 * KV)], E),
    ("gate_up", "swiglu", [(Q4_0, F)], E),
    ("down", "residual", [(Q4_0, E)], F),
]


def check(rng, rows: list[int], cases: list) -> bool:
    ok = True
    for name, kind, segs, cols in cases:
        ws = [weight(t, n, cols, rng) for t, n in segs]
        ups = [weight(segs[0][0], segs[0][1], cols, rng)] if kind == "swiglu" else None
        nw = torch.randn(cols, device="cuda")
        for R in rows:
            x = torch.randn(R, cols, device="cuda")
            for variant in (dict(kernel="warp", rows_rw=2 if R % 2 else 1), dict(kernel="tile"),
                            dict(kernel="tile", tile_nx=4)):
                outs = [torch.randn(R, n, device="cuda") for _, n in segs]
                base = [o.clone() for o in outs]
                kw = dict(norm_weight=nw, eps=1e-5) if kind != "residual" else dict(residuals=outs)
                cg.launch(ws, x, outs, ups=ups, **variant, **kw)
                for r in range(R):
                    one = [b[r].clone() for b in base]
                    kw1 = dict(kw, residuals=one) if kind == "residual" else kw
                    cg.launch(ws, x[r], one, ups=ups, **kw1)
                    if not all(torch.equal(o[r], e) for o, e in zip(outs, one)):
                        print(f"check {name} {segs[0][0].name} R={R} {variant} row {r}: NOT bit-identical", flush=True)
                        ok = False
                        break
    print(f"check: rows kernels == 1-row kernel per row: {ok}", flush=True)
    return ok


KERNELS = {  # --kernels name: launch() arguments of the rows kernels
    "tile": dict(kernel="tile"), "tile4": dict(kernel="tile", tile_nx=4), "tile8": dict(kernel="tile", tile_nx=8),
    "tile_g1": dict(kernel="tile", tile_groups_=1), "tile_g4": dict(kernel="tile", tile_groups_=4),
    "rw1": dict(kernel="warp", rows_rw=1), "rw2": dict(kernel="warp", rows_rw=2),
}


def step_sums(results: list[dict]) -> dict:
    """Per backend and R: the sum over one TinyLlama Q4_K_M decode step's matmuls (us)."""
    per = {}
    for row in results:
        name = row["case"].split(":")[0]
        if "Q4_0" in row["case"]:
            continue
        mult = 1 if name == "output" else 22
        for k, v in row.items():
            if k.endswith("_us"):
                per.setdefault(k[:-3], {}).setdefault(row["rows"], []).append(mult * v)
    return {k: {R: round(sum(v), 1) for R, v in by_r.items() if len(v) == 5} for k, by_r in per.items()}


def run(rows: list[int], rng, kernels: list[str], cases: list) -> list[dict]:
    results = []
    for name, kind, segs, cols in cases:
        per_copy = sum(n * cols // LAYOUTS[t].block_size * LAYOUTS[t].type_size for t, n in segs)
        per_copy *= 2 if kind == "swiglu" else 1
        n_copies = min(64, max(20, int(240e6 // per_copy) + 1))
        copies = [[weight(t, n, cols, rng) for t, n in segs] for _ in range(n_copies)]
        ups = [weight(segs[0][0], segs[0][1], cols, rng) for _ in range(n_copies)] if kind == "swiglu" else None
        nw = torch.randn(cols, device="cuda")
        label = f"{name}:{'+'.join(f'{t.name}x{n}' for t, n in segs)}:{cols}"
        for R in rows:
            x = torch.randn(R, cols, device="cuda")
            xh = x.half()
            outs = [torch.zeros(R, n, device="cuda") for _, n in segs]
            outh = [torch.zeros(R, n, device="cuda", dtype=torch.float16) for _, n in segs]

            def rows_call(i, how):
                up = [ups[i]] if ups else None
                if kind == "residual":
                    return lambda: cg.launch(copies[i], x, outs, residuals=outs, **how)
                return lambda: cg.launch(copies[i], x, outs, norm_weight=nw, eps=1e-5, ups=up, **how)

            def loop_call(i):
                up = [ups[i]] if ups else None
                if kind == "residual":
                    return lambda: [cg.launch(copies[i], x[r], [o[r] for o in outs], residuals=[o[r] for o in outs])
                                    for r in range(R)]
                return lambda: [cg.launch(copies[i], x[r], [o[r] for o in outs], norm_weight=nw, eps=1e-5, ups=up)
                                for r in range(R)]

            def gemm_call(i):
                if kind == "swiglu":
                    return lambda: tgemm.gemm_gated(copies[i][0], ups[i], xh, outh[0])
                return lambda: [tgemm.gemm(w, xh, o) for w, o in zip(copies[i], outh)]

            row = {"case": label, "rows": R, "weight_bytes": per_copy}
            makers = [(f"rows_{k}", lambda i, k=k: rows_call(i, KERNELS[k])) for k in kernels if k in KERNELS]
            makers += [("gemm", gemm_call)] if "gemm" in kernels else []
            makers += [("loop", loop_call)] if "loop" in kernels and R <= 8 else []
            if R >= 8 and "rw2" in kernels:   # rw2's default tile (rows_tile: 8 rows of 2048, 4 of 5632), the other
                alt = 4 if cg.rows_tile(cols, R) == 8 else 8
                if 4 * alt * cols <= cg.SMEM_LIMIT:
                    how = dict(KERNELS["rw2"], rows_tile_=alt)
                    makers.append((f"rows_rw2_tile{alt}", lambda i, how=how: rows_call(i, how)))
            for backend, make in makers:
                try:
                    row[f"{backend}_us"] = graph_us([make(i) for i in range(n_copies)])
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"{label} R={R} {backend} failed: {e}", flush=True)
            results.append(row)
            print(f"{label:42s} R={R:3d} " + "  ".join(f"{k[:-3]} {v:8.2f} us" for k, v in row.items()
                                                      if k.endswith("_us")), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--rows", default="1,2,4,8,16,32,64")
    p.add_argument("--kernels", default="tile,rw2,gemm",
                   help=f"comma list of {', '.join(KERNELS)}, gemm, loop")
    p.add_argument("--no-check", action="store_true", help="skip the bitwise check")
    p.add_argument("--only-q4km", action="store_true", help="only the Q4_K_M shapes (the step sums)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [int(r) for r in a.rows.split(",")]
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    t0 = time.time()
    if cg.library(torch.device("cuda")) is None:
        print("the CUDA kernels did not build", flush=True)
        return 1
    meta["build_s"] = time.time() - t0
    rng = np.random.default_rng(int(time.time()))
    cases = [c for c in CASES if not a.only_q4km or all(t != Q4_0 for t, _ in c[2])]
    meta["check_ok"] = None if a.no_check else check(rng, [1, 2, 3, 8, 17, 64], cases)
    results = run(rows, rng, a.kernels.split(","), cases)
    steps = step_sums(results)
    for k, by_r in steps.items():
        line = "  ".join(f"R={R} {v / 1e3:.2f} ms" for R, v in by_r.items())
        print(f"step (Q4_K_M, 22 layers + output) {k:16s} {line}", flush=True)
    (out / "cuda_gemv_rows_bench.json").write_text(json.dumps({"meta": meta, "results": results, "step_us": steps},
                                                               indent=1))
    return 0 if meta["check_ok"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
