"""Compile the fused GEMM (quant/triton/gemm.py) for sm_90 without a GPU and check what
the compiler made of it: for every codec type, every BLOCK_M the launcher can pick and
both flavours (plain, gated: SwiGLU) and each way K runs (``one``: one run, ``seq``: the
runs of split-K added in turn in one program, ``part``: one run per program into the
partials), with the launch shape of :func:`gemm_config`; and the reduction of the partials:

* the dot runs on Hopper's warp-group MMA (``nvidia_mma`` version 3 in the TTGIR,
  ``HGMMA`` in the SASS), the same instruction family at every BLOCK_M;
* no register spills (``STACK:0``: no local-memory frame);
* shared memory within an SM's 227 KiB per block.

Uses Triton's offline compiler and the ``cuobjdump`` its wheel carries; the device's
Triton version may differ from this machine's (run it under both where possible).

    python benchmarks/gemm_compile_check.py [--types Q4_K,Q6_K]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gguflm.gguf.types import GGMLType
from gguflm.quant.triton import gemm as G
from gguflm.quant.triton.codecs import CODECS, unit
from gguflm.quant.triton.planes import PackedWeight

SMEM_LIMIT = 227 * 1024
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
POINTERS = {"W_ptr": "*u8", "WU_ptr": "*u8", "T_ptr": "*fp32", "X_ptr": "*fp16", "B_ptr": "*fp32", "Y_ptr": "*fp16",
            "P_ptr": "*fp32"}
INTS = ["M", "N", "K", "nb", "n_blocks", "x_row_stride", "y_row_stride", "split_blocks", "n_splits"]
MODES = {"one": (False, False), "seq": (True, False), "part": (True, True)}  # (SPLIT, PARTIAL)


def resources(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack bytes, HGMMA count, HMMA count) of a cubin, by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    return int(m.group(1)), int(m.group(2)), sass.count("HGMMA"), len(re.findall(r"\bHMMA", sass))


def compile_one(t: GGMLType, bm: int, swiglu: bool, mode: str = "one"):
    c = CODECS[t]
    w = PackedWeight(t, 64, 2048, None)  # shape only: gemm_config reads the type and row length
    cfg = G.gemm_config(w)
    sig = dict(POINTERS, **{k: "i32" for k in INTS})
    consts = dict(DECODE=c.fn, QK=c.block_size, UNIT=unit(c), BB=cfg.bb, BLOCK_N=cfg.block_n, BLOCK_M=bm,
                  GATED=swiglu, GELU=False, BIAS=False, SPLIT=MODES[mode][0], PARTIAL=MODES[mode][1])
    sig.update({k: "constexpr" for k in consts})
    names = list(G._gemm_kernel.arg_names)
    div16 = [names.index(n) for n in list(POINTERS) + [n for n in INTS if n not in ("M", "split_blocks", "n_splits")]]
    attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(G._gemm_kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return k, cfg, time.perf_counter() - t0


def compile_reduce(swiglu: bool):
    sig = {"P_ptr": "*fp32", "B_ptr": "*fp32", "Y_ptr": "*fp16", "M": "i32", "N": "i32", "n_splits": "i32",
           "y_row_stride": "i32"}
    consts = dict(GATED=swiglu, GELU=False, BIAS=False, BLOCK_N=G.REDUCE_N, BLOCK_M=G.REDUCE_M)
    sig.update({k: "constexpr" for k in consts})
    return triton.compile(ASTSource(G._reduce_kernel, sig, consts, {}), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--types", default=",".join(t.name for t in CODECS))
    p.add_argument("--modes", default=",".join(MODES))
    a = p.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_90")
    bad = 0
    for swiglu in (False, True):
        r = resources(compile_reduce(swiglu).asm["cubin"])
        print(f"reduction swiglu={swiglu}: regs {r[0]} stack {r[1]}  {'ok' if r[1] == 0 else 'FAIL'}")
        bad += r[1] != 0
    print(f"{'type':<7} {'mode':>4} {'BM':>4} {'swiglu':>6} {'compile s':>9} {'regs':>5} {'stack':>5} {'smem KiB':>8} "
          f"{'HGMMA':>5} {'HMMA':>4}  ok")
    for name in a.types.split(","):
        t = GGMLType[name]
        cap = G.gemm_config(PackedWeight(t, 64, 2048, None)).max_block_m
        for mode in a.modes.split(","):
            for swiglu in (False, True):
                for bm in (16, 32, 64, 128):
                    # the launcher's choices: partials up to SPLIT_MAX_M rows (gated: always),
                    # runs in turn above (gated: only when a test asks, BLOCK_M <= 64)
                    if (bm > cap or (mode == "part" and bm > G.SPLIT_MAX_M and not swiglu)
                            or (mode == "seq" and swiglu and bm > 64)):
                        continue
                    k, cfg, dt = compile_one(t, bm, swiglu, mode)
                    regs, stack, hgmma, hmma = resources(k.asm["cubin"])
                    smem = k.metadata.shared
                    mma3 = "versionMajor = 3" in k.asm["ttgir"]
                    ok = mma3 and hgmma > 0 and hmma == 0 and stack == 0 and smem <= SMEM_LIMIT
                    bad += not ok
                    print(f"{name:<7} {mode:>4} {bm:>4} {str(swiglu):>6} {dt:9.1f} {regs:>5} {stack:>5} "
                          f"{smem / 1024:8.0f} {hgmma:>5} {hmma:>4}  {'ok' if ok else 'FAIL'}", flush=True)
    print("all ok" if not bad else f"{bad} FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
