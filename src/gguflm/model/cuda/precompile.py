"""Compile, at load and several at once, the Triton kernels of a first prompt and the
decode step (the default on a GPU; ``GGUFLM_PRECOMPILE=0`` turns it off). Measured on an
H200 (TinyLlama-1.1B shape Q4_K_M, benchmarks/results/2026-12-05-h200-generate-splitk.json):
17 kernels compiled in 2.0 s instead of one after the other; cold start to the first token
5.6 s instead of 8.8 s with a cache missing the prompt's kernels, 22.4 instead of 29.1 s
with an empty one.

Without it each kernel compiles when first launched, one after the other (about a
second each on an H200: most of a cold start with an empty cache). Here a dry run of
prefills of 3 and 64 tokens (padded to their length buckets, as a new prompt is) and of the decode step (both of its graphs' inputs; with ``GGUFLM_CUDA_DECODE_ROWS=gemv``
also the batched step of one decode row), on a scratch cache, runs the same Python code as
the real steps, but every Triton launch only asks for its kernel (``warmup``: nothing is
launched) and each compilation that would follow (``JITFunction._do_compile``, with the
exact key, signature, constexprs, attributes and options of the launch) is recorded
instead of run; CUDA GEMV launches are skipped (:func:`gguflm.quant.cuda.gemv.dry_run`).
The torch operations between them run on the scratch buffers' arbitrary contents, and
nothing reads them back. The recorded compilations are then run by a thread pool (Triton's
compiler leaves the GIL for most of its work and runs ptxas as a subprocess): each kernel
lands in its in-memory and disk caches under the key its launch will look up. Any
failure leaves the kernels to compile lazily, as without it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from gguflm.quant.cuda import timing

PROMPTS = (3, 64)  # tokens of the traced prefills, run as a new prompt is (padded to its length bucket):
# a short one (the fused GEMM at BLOCK_M 16) and one of 64 (from there on, cuBLAS over dequantized weights)

_tracing = threading.local()


def enabled() -> bool:
    return os.environ.get("GGUFLM_PRECOMPILE", "1") != "0"


def trace(model: Any) -> list[tuple[Any, tuple, dict]]:
    """What a first prompt and decode step of ``model`` (a CudaModel) would compile: the
    (JITFunction, args, kwargs) of each ``_do_compile`` call, none compiled or launched."""
    from triton.runtime.jit import JITFunction

    from gguflm.model.cuda.decode import DecodeGraphs
    from gguflm.model.cuda.forward import forward_plain, prefill_bucket
    from gguflm.quant.cuda.gemv import dry_run

    orig_compile, orig_run = JITFunction._do_compile, JITFunction.run
    found: dict[tuple[int, str], tuple[Any, tuple, dict]] = {}

    def _do_compile(self, key, *args, **kwargs):
        if getattr(_tracing, "on", False):
            found.setdefault((id(self), str(key)), (self, (key, *args), kwargs))
            return None                                   # not compiled now (run() then launches nothing)
        return orig_compile(self, key, *args, **kwargs)

    def run(self, *args, grid, warmup, **kwargs):
        # while tracing (this thread only) every launch is a warm-up: compile at most, never launch
        return orig_run(self, *args, grid=grid, warmup=warmup or getattr(_tracing, "on", False), **kwargs)

    cfg, w, dev = model.config, model.weights, model.device
    JITFunction._do_compile, JITFunction.run = _do_compile, run
    _tracing.on = True
    try:
        with dry_run(), torch.inference_mode():
            cache = model.new_cache(1)
            k, v = cache.k[:, 0], cache.v[:, 0]
            last = torch.zeros(1, dtype=torch.long, device=dev)
            for n in {prefill_bucket(p, k.shape[2]) or p for p in PROMPTS if p <= k.shape[2]}:
                forward_plain(cfg, w, model.rope, torch.zeros(n, dtype=torch.long, device=dev), 0, k, v, True,
                              last=last)
            step = DecodeGraphs(cfg, w, model.rope, k, v, use_graphs=False)
            step._run(0)
            if k.shape[2] >= 2:  # graph 1 reads its token/position at another alignment: its own specializations
                step._run(1)
            if getattr(model, "decode_rows", False):   # GGUFLM_CUDA_DECODE_ROWS=gemv: a lone decode row of the server
                from gguflm.model.cuda.batched import BatchedDecode

                one = torch.zeros(1, dtype=torch.long, device=dev)
                BatchedDecode(cfg, w, model.rope, cache, 1, use_graphs=False, shared_slots=model.mixed_steps,
                              decode_width=1).step(one, one, one)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            del step, cache
    finally:
        _tracing.on = False
        JITFunction._do_compile, JITFunction.run = orig_compile, orig_run
    return list(found.values())


def precompile(model: Any) -> None:
    """Trace and compile (see the module docstring); never raises."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return
    t = time.perf_counter()
    try:
        specs = trace(model)
    except Exception as e:  # noqa: BLE001 - a Triton without these hooks, an unexpected path: lazy compiles
        timing.note(f"precompile: tracing failed ({type(e).__name__}: {str(e)[:200]}); kernels compile lazily")
        return
    timing.note(f"precompile: traced {len(specs)} Triton kernels to compile", time.perf_counter() - t)
    if not specs:
        return
    device = model.device
    failed: list[str] = []

    def one(item: tuple[Any, tuple, dict]) -> None:
        fn, args, kwargs = item
        try:
            if device.type == "cuda":     # the model's device current in this thread too
                with torch.cuda.device(device):
                    fn._do_compile(*args, **kwargs)   # what run() would have called: into its caches
            else:
                fn._do_compile(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - compiled lazily instead
            failed.append(f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {str(e)[:200]}")

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(len(specs), os.cpu_count() or 4, 16)),
                            thread_name_prefix="gguflm-triton") as pool:
        list(pool.map(one, specs))
    timing.settled()
    timing.note(f"precompile: {len(specs) - len(failed)} of {len(specs)} Triton kernels ready",
                time.perf_counter() - t)
    if failed and timing.ON:
        for why in failed:
            print(f"{timing.PREFIX} precompile failed: {why}", file=sys.stderr)
