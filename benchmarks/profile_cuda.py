"""Where the CUDA path spends its time. Decode: the replay time of the captured graph,
the bytes a step must read (weights + KV cache) over that time, and the per-kernel GPU
time of eager steps (torch.profiler). Prefill: wall time of a ``--prefill``-token
prefill, and its per-kernel GPU time.

    python benchmarks/profile_cuda.py MODEL.gguf [--position 64] [--steps 50] [--prefill 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch

import gguflm


def kernel_table(prof, runs: int, top: int) -> None:
    per = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += e.device_time_total / runs
            per[e.name][1] += 1
    total = sum(v[0] for v in per.values())
    print(f"  GPU kernel time {total:.1f} us per run (launch gaps excluded):")
    for name, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {us:8.1f} us {us / total * 100:5.1f}%  x{n // runs:<4d} {name[:90]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--position", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prefill", type=int, default=512)
    a = p.parse_args(argv)
    m = gguflm.load(a.model, device="cuda", n_ctx=max(a.position + 2, a.prefill)).model
    print(f"weights {m.weights.nbytes / 2**20:.1f} MiB, torch allocated {torch.cuda.memory_allocated() / 2**20:.1f} MiB")
    g = m.graphs(m.session_cache(), 0)
    g.tok[0], g.pos[0] = 1, a.position
    g.step(0)                                   # capture
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(a.steps):                    # graph 0 reads slot 0 and writes slot 1: same inputs each time
        g.step(0)
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / a.steps
    kv = 2 * m.config.n_layer * m.config.n_head_kv * (a.position + 1) * m.config.head_dim * 2
    weights = m.weights.nbytes
    print(f"graph step: {step_ms * 1e3:.1f} us = {1e3 / step_ms:.0f} tok/s; reads {weights / 2**20:.1f} MiB weights "
          f"+ {kv / 2**20:.2f} MiB KV -> {(weights + kv) / (step_ms * 1e-3) / 1e9:.0f} GB/s")
    g.use_graphs = False
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g.step(0)
        torch.cuda.synchronize()
    print("eager decode step:")
    kernel_table(prof, 5, 16)
    if a.prefill:
        ids = [(7 * i) % m.config.n_vocab for i in range(a.prefill)]
        for _ in range(2):
            m.prefill(ids)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            m.prefill(ids)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / 5
        print(f"prefill {a.prefill}: {dt * 1e3:.2f} ms = {a.prefill / dt:.0f} tok/s")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            m.prefill(ids)
            torch.cuda.synchronize()
        kernel_table(prof, 1, 14)
    return 0


if __name__ == "__main__":
    sys.exit(main())
