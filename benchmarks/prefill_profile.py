"""Where a fresh prompt's prefill goes on CUDA (issue 14), and what a batched decode step
costs per width (issue 17).

1. ``pp N`` through the generation loop, cold (shape never seen) and warm, as ``gguflm
   bench`` measures it;
2. one eager prefill of a never-seen N-token prompt (``Model.prefill``): host time to
   launch it (no sync) against the time until the device has finished, and the number
   of kernel launches;
3. torch.profiler over one cold pp through the loop: the host-side ops by self CPU
   time and the GPU kernels by device time;
4. the batched decode step (captured graph replays) at widths 2 .. 64.

Run it twice to compare the many-token matmul paths: ``GGUFLM_MATMUL=cublas`` (tile
dequantization + cuBLAS) and the default fused GEMM.

    python benchmarks/prefill_profile.py MODEL.gguf [-p 512] [--widths 2,4,8,16,32,64]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict

import torch

import gguflm
from gguflm.engine.bench import Bench


def kernel_table(prof, top: int) -> None:
    per = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += e.device_time_total
            per[e.name][1] += 1
    total = sum(v[0] for v in per.values())
    n = sum(v[1] for v in per.values())
    print(f"  GPU kernel time {total / 1e3:.2f} ms in {n} kernels:")
    for name, (us, k) in sorted(per.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {us:9.1f} us {us / total * 100:5.1f}%  x{k:<4d} {name[:100]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("-p", type=int, default=512)
    p.add_argument("--widths", default="2,4,8,16,32,64")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    llm = gguflm.load(a.model, device="cuda", n_ctx=max(1024, a.p + 8))
    m = llm.model
    print(f"load {time.perf_counter() - t0:.1f} s; weights {m.weights.nbytes / 2**20:.1f} MiB")
    bench = Bench(llm, a.reps)
    t0 = time.perf_counter()
    for r in bench.pp(a.p):
        print(f"pp{a.p} {r.note.split(':')[0]}: {r.mean:.0f} ± {r.sd:.0f} tok/s  {[round(v) for v in r.values]}")
    print(f"  (pp rows took {time.perf_counter() - t0:.1f} s, compilation included)")

    rng = random.Random(1)
    V = m.config.n_vocab
    cache = m.new_cache(1, a.p + 8)
    for _ in range(2):
        ids = [rng.randrange(V) for _ in range(a.p)]
        m.prefill(ids, cache)
    torch.cuda.synchronize()
    for _ in range(3):
        ids = [rng.randrange(V) for _ in range(a.p)]
        t0 = time.perf_counter()
        m.prefill(ids, cache)
        t_host = time.perf_counter() - t0
        torch.cuda.synchronize()
        t_all = time.perf_counter() - t0
        print(f"eager prefill {a.p}: host launch {t_host * 1e3:.2f} ms, done {t_all * 1e3:.2f} ms "
              f"= {a.p / t_all:.0f} tok/s")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        m.prefill([rng.randrange(V) for _ in range(a.p)], cache)
        torch.cuda.synchronize()
    print("eager prefill, profiled:")
    kernel_table(prof, 14)

    m.forget_shapes()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        bench._run(bench._prompt(a.p), 1)
        dt = time.perf_counter() - t0
    print(f"one cold pp through the loop, profiled: {dt * 1e3:.1f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
    kernel_table(prof, 10)

    widths = [int(w) for w in a.widths.split(",") if w]
    if widths:
        bc = m.new_cache(max(widths), 256)
        for wd in widths:
            step = m.batched(bc, wd)
            tok = torch.randint(0, V, (wd,), device="cuda")
            pos = torch.full((wd,), 100, dtype=torch.int32, device="cuda")
            slots = torch.arange(wd, dtype=torch.int32, device="cuda")
            step.step(tok, pos, slots, *m._stream_and_pool())
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(20):
                step.graph.replay()
            e.record()
            torch.cuda.synchronize()
            ms = s.elapsed_time(e) / 20
            print(f"batched step width {wd:3d}: {ms * 1e3:7.1f} us = {wd / ms * 1e3:8.0f} tok/s")
    print(f"peak reserved {torch.cuda.max_memory_reserved() / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
