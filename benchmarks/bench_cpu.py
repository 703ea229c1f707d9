"""CPU speed: gguflm's quantized kernels against llama.cpp on the same files and cores.

Two parts (both by default):

kernels  One GEMV (x [1, K] @ W^T) of real SmolLM2 weights -- 1536x576, 576x1536 and the
         49152x576 output -- in Q4_1 and Q8_0, by every approach compared for the CPU path:
           ours        the fused dequantize x dot C++ kernel (AVX-512 path), exact
           portable    the same kernel's portable C++ path, exact
           dense_f32   torch F.linear on a float32 copy of the weight (what the engine did
                       before: 7x the memory of Q4_1), exact
           int4pack    torch's _weight_int4pack_mm_for_cpu (Q4_1 only; needs bf16
                       activations and bf16 scales: not exact; float32 input is ~30x slower)
           llama.cpp   ggml_mul_mat in a libggml graph (x rounded to 8 bits: not exact)
         reported as microseconds and GB/s of quantized weight read (weights hot in cache:
         each is multiplied 50 times in a row).

model    SmolLM2-135M-Instruct Q4_1 and llama.cpp's own Q4_K_M and Q8_0 requantizations.
         For each file, a fresh process per measurement, alternating llama.cpp
         (llama-cpp-python, n_threads = --threads) and gguflm (threads = --threads):
           load      seconds in Llama(...) / gguflm.load(...) (imports excluded)
           prefill   tokens/s of a 512-token prompt, best of 3 (gguflm: a fresh random
                     prompt each time, through the generation loop: gguflm.engine.bench)
           decode    tokens/s of single-token steps after it: llama.cpp per window of 16
                     steps, 128 steps in all (no sampling); gguflm 128 greedy tokens
                     through the generation loop (sampling, detokenization), per run
           peak RSS  the process's ru_maxrss (torch's import alone is ~220 MB)
         --reps rounds; the best of each metric is reported (the machine is shared: the
         load average of every run goes into the JSON), with ratios ours / llama.cpp.

generate The user path, as issue 14 asks: ``gguflm.load(path).generate(ids, temperature=0)``
         against llama-cpp-python's ``Llama.create_completion(ids, temperature=0, stream=True)``,
         a fresh process per measurement, the same thread count:
           pp512     a fresh random 512-token prompt each repetition (no prefix cache can
                     help), max_tokens=1: 512 / seconds to the end of the call
           tg        tokens/s from the first streamed piece to the last (--tg tokens), the
                     greedy continuation of a short English text (TG_PROMPT, each engine's
                     own tokenizer: a random-id prompt let a base model stop at its end-of-
                     text token after one or two tokens, which timed one step, not --tg)
           tg_busy   the same while another process keeps core 1 busy (``--busy``): a
                     pinned ``while True: pass``; the ratio to tg says what contention costs
           peak RSS  VmHWM of the child (the same number as the model part's column)
           rss_stages  the child's resident set after each stage (``rss_stages``: VmRSS,
                     VmHWM, anonymous and file-backed parts, MB): the engine's imports
                     (gguflm: torch, then gguflm with its C++ kernels), load, warm-up, the
                     pp512 runs, tg; printed as a breakdown (file-backed = code of the
                     libraries and the mapped weights the run has touched)
         Each run records ``others_cores``: how many cores other processes kept busy during
         it, on average; ``--wait-idle PCT`` starts each child only once the machine was PCT %
         idle over 2 s (a shared machine: runs then see little contention, which
         ``others_cores`` shows).
         ``--cpu-clock`` (one thread only): pp512 and tg timed by each child's process CPU
         time instead of the wall clock, which a machine shared with other work slows
         unevenly; with one thread (no thread waiting at a barrier) CPU time is the work
         the engine does, a fair comparison while other processes run (not a wall-clock speed)
         Models: SmolLM2 Q4_1 / Q4_K_M / Q8_0 and, when present in ~/.cache/gguflm-bench
         (benchmarks/make_tinyllama.py + llama.cpp's quantizer), the TinyLlama-1.1B shape
         Q4_K_M / Q4_0 (``--models`` picks).

    python benchmarks/bench_cpu.py [--threads 2[,1]] [--reps 3] [--part kernels|model|generate] [--busy]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_PREFILL, N_DECODE, N_CTX = 512, 128, 1024
PREFILL_REPS, DECODE_WINDOW = 3, 16  # best prefill of 3; decode rate of each 16-token window
QUANTS = ("Q4_1", "Q4_K_M", "Q8_0")


def model_path(quant: str) -> Path:
    """SmolLM2's shipped Q4_1 file, or its requantization by llama.cpp's own quantizer."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import quantize_with_llama_cpp  # the test suite's cached requantizer

    from gguflm.models import resolve

    src = resolve("smollm2-135m")
    return src if quant == "Q4_1" else quantize_with_llama_cpp(src, quant)


def prompt_ids(n: int) -> list[int]:
    return [(i * 7919) % 40000 + 100 for i in range(n)]  # fixed ordinary token ids


# ---------------------------------------------------------------------------------------
# Child processes: one engine, one file, one measurement.
# ---------------------------------------------------------------------------------------

def child_llama(path: str, threads: int) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=N_CTX, n_batch=N_PREFILL,
                          n_ubatch=N_PREFILL, verbose=False)
    load = time.perf_counter() - t0
    ids = prompt_ids(N_PREFILL + N_DECODE)
    llm.eval(ids[:16])  # warm-up: buffers, first touch of the mapped weights
    prefill = []
    for _ in range(PREFILL_REPS):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:N_PREFILL])
        prefill.append(N_PREFILL / (time.perf_counter() - t0))
    decode = []
    for w in range(0, N_DECODE, DECODE_WINDOW):
        t0 = time.perf_counter()
        for tok in ids[N_PREFILL + w:N_PREFILL + w + DECODE_WINDOW]:
            llm.eval([tok])
        decode.append(DECODE_WINDOW / (time.perf_counter() - t0))
    return {"load_s": load, "prefill_tok_s": prefill, "decode_tok_s": decode}


def child_ours(path: str, threads: int) -> dict:
    """Through the generation loop users run (gguflm.engine.bench, what `gguflm bench`
    reports): prefill of a fresh random 512-token prompt, decode after it."""
    import gguflm
    from gguflm.engine.bench import Bench
    from gguflm.quant import cpu

    cpu.kernel_types()  # the C++ build is cached on disk; this only loads it
    t0 = time.perf_counter()
    llm = gguflm.load(path, n_ctx=N_CTX, threads=threads)
    load = time.perf_counter() - t0
    bench = Bench(llm, reps=PREFILL_REPS)
    pre = bench.pp(N_PREFILL)[0].values
    decode = bench.depth(N_DECODE, N_PREFILL).values
    return {"load_s": load, "prefill_tok_s": pre, "decode_tok_s": decode, "path": "generate"}


TINY_DIR = Path.home() / ".cache" / "gguflm-bench"


def generate_models(names: list[str] | None, files: list[str] | None = None) -> dict[str, Path]:
    """name -> file: SmolLM2's three quantizations, and the TinyLlama-shape files if made
    (or ``files``, named by their stems)."""
    if files:
        return {Path(f).stem: Path(f) for f in files}
    out = {f"smollm2-{q}": None for q in QUANTS}
    out.update({f"tinyllama-shape-{q}": TINY_DIR / f"tinyllama-shape-{q}.gguf" for q in ("Q4_K_M", "Q4_0")})
    picked = {}
    for name, path in out.items():
        if names and name not in names:
            continue
        if path is None:
            path = model_path(name.split("-", 1)[1])
        if path.exists():
            picked[name] = path
    return picked


def random_prompt(rng, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, min(vocab, 30000)) for _ in range(n)]


TG_PROMPT = "Once upon a time, in a small village by the sea, there lived"


def rss_now() -> dict:
    """This process's resident set now: VmRSS, VmHWM (peak so far), RssAnon, RssFile (MB)."""
    keys = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in keys:
            out[keys[k]] = round(int(v.split()[0]) / 1024, 1)
    return out


def child_gen(engine: str, path: str, threads: int, tg: int, pp_reps: int) -> dict:
    """One engine's user path: fresh-prompt prefill rates and a streamed greedy decode."""
    import random

    rng = random.Random(1234)
    clock = time.process_time if CPU_CLOCK else time.perf_counter
    stages = []

    def mark(stage: str) -> None:  # a few microseconds, outside the timed spans
        stages.append({"stage": stage, **rss_now()})

    t0 = time.perf_counter()
    mark("start")
    if engine == "llama":
        import llama_cpp

        mark("import llama_cpp")
        llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=N_CTX, n_batch=N_PREFILL,
                              n_ubatch=N_PREFILL, verbose=False)
        vocab = llm.n_vocab()
        tg_ids = llm.tokenize(TG_PROMPT.encode(), add_bos=True)

        def stream(ids, n):
            return (c["choices"][0]["text"] for c in llm.create_completion(ids, max_tokens=n, temperature=0.0,
                                                                           stream=True))
    else:
        import torch  # noqa: F401 (its import is its own stage of the breakdown)

        mark("import torch")
        import gguflm.engine.llm  # what gguflm.load imports
        from gguflm.quant import cpu

        cpu.kernel_types()  # loads the C++ kernels (load would)
        mark("import gguflm + C++ kernels")
        llm = gguflm.load(path, n_ctx=N_CTX, threads=threads)
        vocab = llm.model.config.n_vocab
        tg_ids = llm.tokenizer.encode(TG_PROMPT, add_special=True)

        def stream(ids, n):
            return llm.generate(ids, max_tokens=n, temperature=0.0)
    load = time.perf_counter() - t0
    mark("load")
    for _ in stream(random_prompt(rng, 16, vocab), 4):  # warm-up: buffers, first touch of the weights
        pass
    mark("warm-up (16 + 4 tokens)")
    pp = []
    for i in range(pp_reps):
        ids = random_prompt(rng, N_PREFILL, vocab)
        t0 = clock()
        for _ in stream(ids, 1):
            pass
        pp.append(N_PREFILL / (clock() - t0))
        mark(f"pp{N_PREFILL} #{i + 1}")
    times = []
    for _ in stream(tg_ids, tg + 1):
        times.append(clock())
    mark(f"tg{tg}")
    n = len(times) - 1
    return {"load_s": load, "pp512_tok_s": pp, "tg_tok_s": n / (times[-1] - times[0]) if n > 0 else None,
            "tg_pieces": n, "rss_stages": stages}


BUSY_CPU = 1
CPU_CLOCK = False  # --cpu-clock
WAIT_IDLE = 0      # --wait-idle


def busy_core(cpu: int | None = None) -> subprocess.Popen:
    """A process that keeps core ``cpu`` busy (the contention case of issue 14)."""
    return subprocess.Popen(["taskset", "-c", str(BUSY_CPU if cpu is None else cpu), sys.executable, "-c",
                             "while True: pass"])


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def wait_idle(percent: int, limit_s: float = 600.0) -> float:
    """Wait (at most limit_s) until the machine was idle >= percent % over 2 s; the last idle %."""
    t_end = time.monotonic() + limit_s
    while True:
        b0, t0 = cpu_jiffies()
        time.sleep(2)
        b1, t1 = cpu_jiffies()
        idle = 100.0 * (1 - (b1 - b0) / max(1, t1 - t0))
        if idle >= percent or time.monotonic() > t_end:
            return idle


def run_gen_child(engine: str, path: Path, threads: int, tg: int, pp_reps: int, busy: bool) -> dict:
    hog = busy_core() if busy else None
    idle = wait_idle(WAIT_IDLE) if WAIT_IDLE and not busy else None
    busy0, _ = cpu_jiffies()
    r0, w0 = os.times(), time.perf_counter()
    try:
        time.sleep(0.2 if busy else 0)
        out = subprocess.run([sys.executable, __file__, "--child", f"gen-{engine}", "--path", str(path), "--threads",
                              str(threads), "--tg", str(tg), "--pp-reps", str(pp_reps)] + ["--cpu-clock"] * CPU_CLOCK,
                             capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["loadavg"] = os.getloadavg()[0]
    # cores that other processes kept busy during the child, on average (machine busy time
    # minus the child's own CPU time): what contention the measurement saw
    r1, busy1 = os.times(), cpu_jiffies()[0]
    child = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    res["others_cores"] = max(0.0, ((busy1 - busy0) / os.sysconf("SC_CLK_TCK") - child) / (time.perf_counter() - w0))
    if idle is not None:
        res["idle_before_pct"] = idle
    return res


def bench_generate(threads: int, reps: int, models: list[str] | None, tg: int, busy: bool,
                   files: list[str] | None = None) -> dict:
    results = {}
    for name, path in generate_models(models, files).items():
        runs = {"llama.cpp": [], "gguflm": []}
        busy_runs = {"llama.cpp": [], "gguflm": []}
        for _ in range(reps):
            for engine in ("llama", "ours"):
                key = "llama.cpp" if engine == "llama" else "gguflm"
                runs[key].append(run_gen_child(engine, path, threads, tg, 2, False))
                if busy:
                    busy_runs[key].append(run_gen_child(engine, path, threads, tg, 0, True))
        best = {}
        for e in runs:
            best[e] = {"pp512_tok_s": max(max(r["pp512_tok_s"]) for r in runs[e]),
                       "tg_tok_s": max(r["tg_tok_s"] or 0 for r in runs[e]),
                       "peak_rss_mb": min(r["peak_rss_mb"] for r in runs[e]),
                       "load_s": min(r["load_s"] for r in runs[e])}
            if busy:
                best[e]["tg_busy_tok_s"] = max(r["tg_tok_s"] or 0 for r in busy_runs[e])
                best[e]["busy_over_idle"] = best[e]["tg_busy_tok_s"] / best[e]["tg_tok_s"]
        for e in runs:  # the stages of the run with the lowest peak
            best[e]["rss_stages"] = min(runs[e], key=lambda r: r["peak_rss_mb"]).get("rss_stages")
        ratios = {k: best["gguflm"][k] / best["llama.cpp"][k] for k in best["gguflm"]
                  if not isinstance(best["gguflm"][k], list) and best["llama.cpp"][k]}
        results[name] = {"file": str(path.name), "best": best, "ratio_ours_over_llama_cpp": ratios,
                         "runs": runs, "busy_runs": busy_runs if busy else None}
        for e in ("llama.cpp", "gguflm"):
            b = best[e]
            extra = f" tg_busy {b['tg_busy_tok_s']:7.1f} ({b['busy_over_idle']:.0%})" if busy else ""
            print(f"{name:24s} {e:9s} tg {b['tg_tok_s']:7.1f} pp512 {b['pp512_tok_s']:7.1f} "
                  f"rss {b['peak_rss_mb']:5.0f} MB{extra}", flush=True)
        print(f"{name:24s} {'ratio':9s} " + " ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), flush=True)
        for e in ("llama.cpp", "gguflm"):
            print(f"{'':24s} {e:9s} rss MB after: " + ", ".join(
                f"{st['stage']} {st['rss']:.0f}" for st in best[e]["rss_stages"] or ()), flush=True)
    return results


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    over execve from the parent, which here has torch and models loaded."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(engine: str, path: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", engine, "--path", str(path), "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_model(threads: int, reps: int) -> dict:
    results = {}
    for quant in QUANTS:
        path = model_path(quant)
        runs = {"llama.cpp": [], "gguflm": []}
        for _ in range(reps):
            for engine in ("llama.cpp", "gguflm"):
                run = run_child("llama" if engine == "llama.cpp" else "ours", path, threads)
                run["loadavg"] = os.getloadavg()[0]
                runs[engine].append(run)
        best = {e: {"load_s": min(r["load_s"] for r in rs),
                    "prefill_tok_s": max(max(r["prefill_tok_s"]) for r in rs),
                    "decode_tok_s": max(max(r["decode_tok_s"]) for r in rs),
                    "decode_median_tok_s": statistics.median(v for r in rs for v in r["decode_tok_s"]),
                    "peak_rss_mb": min(r["peak_rss_mb"] for r in rs)}
                for e, rs in runs.items()}
        ours, ref = best["gguflm"], best["llama.cpp"]
        ratios = {k: ours[k] / ref[k] for k in ours}
        results[quant] = {"file": path.name, "best": best, "ratio_ours_over_llama_cpp": ratios, "runs": runs}
        print(f"{quant:7s} threads={threads} {'decode tok/s (best/median)':>27s} {'prefill-512 tok/s':>18s} "
              f"{'peak RSS MB':>12s} {'load s':>8s}")
        for e in ("llama.cpp", "gguflm"):
            b = best[e]
            print(f"{'':7s} {e:9s} {b['decode_tok_s']:17.1f} / {b['decode_median_tok_s']:6.1f} "
                  f"{b['prefill_tok_s']:18.1f} {b['peak_rss_mb']:12.0f} {b['load_s']:8.3f}")
        print(f"{'':7s} {'ratio':9s} {ratios['decode_tok_s']:16.2f}x / {ratios['decode_median_tok_s']:5.2f}x "
              f"{ratios['prefill_tok_s']:17.2f}x {ratios['peak_rss_mb']:11.2f}x {ratios['load_s']:7.2f}x", flush=True)
    return results


# ---------------------------------------------------------------------------------------
# Kernel microbenchmarks.
# ---------------------------------------------------------------------------------------

class GGML:
    """libggml (from llama-cpp-python) through ctypes: build a graph of ``reps`` identical
    ggml_mul_mat nodes and time its computation, as llama.cpp multiplies a weight."""

    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    def __init__(self):
        lib = Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib"
        self.base = ctypes.CDLL(str(next(lib.glob("libggml-base.so*"))), mode=ctypes.RTLD_GLOBAL)
        self.cpu = ctypes.CDLL(str(next(lib.glob("libggml-cpu.so*"))), mode=ctypes.RTLD_GLOBAL)
        b, vp = self.base, ctypes.c_void_p
        b.ggml_init.restype, b.ggml_init.argtypes = vp, [self.InitParams]
        b.ggml_new_tensor_2d.restype = vp
        b.ggml_new_tensor_2d.argtypes = [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        b.ggml_mul_mat.restype, b.ggml_mul_mat.argtypes = vp, [vp, vp, vp]
        b.ggml_new_graph.restype, b.ggml_new_graph.argtypes = vp, [vp]
        b.ggml_build_forward_expand.argtypes = [vp, vp]
        b.ggml_get_data.restype, b.ggml_get_data.argtypes = vp, [vp]
        b.ggml_free.argtypes = [vp]
        self.cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
        self.cpu.ggml_cpu_init()

    def gemv_seconds(self, raw, ggml_type: int, n: int, k: int, threads: int, reps: int = 50) -> float:
        import numpy as np

        b = self.base
        ctx = b.ggml_init(self.InitParams(raw.nbytes + reps * n * 4 + (64 << 20), None, False))
        w = b.ggml_new_tensor_2d(ctx, ggml_type, k, n)
        ctypes.memmove(b.ggml_get_data(w), raw.ctypes.data, raw.nbytes)
        x = b.ggml_new_tensor_2d(ctx, 0, k, 1)
        xv = np.random.default_rng(0).standard_normal(k).astype(np.float32)
        ctypes.memmove(b.ggml_get_data(x), xv.ctypes.data, xv.nbytes)
        graph = b.ggml_new_graph(ctx)
        for _ in range(reps):
            b.ggml_build_forward_expand(graph, b.ggml_mul_mat(ctx, w, x))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            self.cpu.ggml_graph_compute_with_ctx(ctx, graph, threads)
            best = min(best, time.perf_counter() - t0)
        b.ggml_free(ctx)
        return best / reps


def best_seconds(fn, reps: int = 50, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def bench_kernels(threads: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import gguflm
    from gguflm.quant import cpu

    torch.set_num_threads(threads)
    ggml = GGML()
    results = {}
    for quant in ("Q4_1", "Q8_0"):
        f = gguflm.GGUFFile(model_path(quant))
        for name in ("blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "token_embd.weight"):
            info = f.tensors[name]
            k, n = info.shape
            raw = np.ascontiguousarray(f.tensor_data(name))
            w = cpu.QuantWeight(raw, info.ggml_type, info.shape)
            x = torch.randn(1, k)
            dense = gguflm.dequantize(raw, info.ggml_type, info.shape)
            times = {}
            cpu.use_simd(True)
            times["ours"] = best_seconds(lambda: cpu.qmatmul(x, w))
            cpu.use_simd(False)
            times["portable"] = best_seconds(lambda: cpu.qmatmul(x, w), reps=5, rounds=3)
            cpu.use_simd(True)
            times["dense_f32"] = best_seconds(lambda: F.linear(x, dense), reps=10)
            if info.ggml_type == gguflm.GGMLType.Q4_1:
                packed, scale_zero = int4pack(raw, k, n)
                xb = x.bfloat16()
                times["int4pack"] = best_seconds(
                    lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, scale_zero), reps=20)
            times["llama.cpp"] = ggml.gemv_seconds(raw, int(info.ggml_type), n, k, threads)
            key = f"{quant} {name} [{n}x{k}]"
            results[key] = {a: {"us": t * 1e6, "GB_s": raw.nbytes / t / 1e9} for a, t in times.items()}
            print(f"{key:42s} " + "  ".join(f"{a} {t * 1e6:8.1f}us {raw.nbytes / t / 1e9:5.1f}GB/s"
                                           for a, t in times.items()), flush=True)
    return results


def int4pack(raw, k: int, n: int):
    """Q4_1 blocks as torch's int4pack operands: w = (q - 8) * scale + zero per 32-group,
    scale = d and zero = m + 8 d (in bf16: the op's requirement, and where it stops being exact)."""
    import numpy as np
    import torch

    blocks = raw.reshape(n, k // 32, 20)
    d = blocks[:, :, 0:2].copy().view(np.float16).astype(np.float32)[..., 0]      # [n, k/32]
    m = blocks[:, :, 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
    qs = blocks[:, :, 4:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, k).astype(np.int32)  # [n, k]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q), 2)
    scale_zero = torch.from_numpy(np.stack([d.T, (m + 8 * d).T], axis=-1)).bfloat16()  # [k/32, n, 2]
    return packed, scale_zero


# ---------------------------------------------------------------------------------------

def machine() -> dict:
    cpu_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor())
    import torch

    import llama_cpp

    return {"cpu": cpu_name, "cores": os.cpu_count(), "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__,
            "python": platform.python_version(), "loadavg": list(os.getloadavg())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2", help="thread counts, comma-separated (default 2; e.g. 1,2)")
    ap.add_argument("--reps", type=int, default=3, help="rounds of the model part (best of each is kept)")
    ap.add_argument("--part", choices=("kernels", "model", "generate", "all"), default="all")
    ap.add_argument("--models", default=None, help="generate part: comma-separated names (default: all present)")
    ap.add_argument("--tg", type=int, default=128, help="generate part: tokens decoded per run")
    ap.add_argument("--busy", action="store_true", help="generate part: also decode with core 1 kept busy")
    ap.add_argument("--busy-cpu", type=int, default=1, help="generate part: the core --busy keeps busy")
    ap.add_argument("--files", default=None, help="generate part: comma-separated GGUF files instead of the defaults")
    ap.add_argument("--wait-idle", type=int, default=0, metavar="PCT",
                    help="generate part: start each child once the machine was PCT %% idle over 2 s (at most 10 min)")
    ap.add_argument("--cpu-clock", action="store_true", help="generate part, one thread: time by process CPU time")
    ap.add_argument("--pp-reps", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/<date>-cpu.json)")
    ap.add_argument("--child", choices=("llama", "ours", "gen-llama", "gen-ours"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global CPU_CLOCK, WAIT_IDLE
    CPU_CLOCK, WAIT_IDLE = args.cpu_clock, args.wait_idle
    if CPU_CLOCK and args.threads != "1":
        ap.error("--cpu-clock measures one thread (--threads 1)")
    if args.child:
        if args.child.startswith("gen-"):
            res = child_gen(args.child[4:], args.path, int(args.threads), args.tg, args.pp_reps)
        else:
            res = (child_llama if args.child == "llama" else child_ours)(args.path, int(args.threads))
        res["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(res))
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    report = {"date": datetime.date.today().isoformat(), "threads": threads, "machine": machine(),
              "clock": "process CPU time" if CPU_CLOCK else "wall"}
    if args.part in ("kernels", "all"):
        report["kernels_gemv_m1"] = {str(t): bench_kernels(t) for t in threads}
    if args.part in ("model", "all"):
        report["model"] = {str(t): bench_model(t, args.reps) for t in threads}
    if args.part in ("generate", "all"):
        models = args.models.split(",") if args.models else None
        global BUSY_CPU
        BUSY_CPU = args.busy_cpu
        files = args.files.split(",") if args.files else None
        report["generate"] = {str(t): bench_generate(t, args.reps, models, args.tg, args.busy, files) for t in threads}
    report["loadavg_end"] = list(os.getloadavg())
    out = args.out or ROOT / "benchmarks" / "results" / f"{report['date']}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} (load average {report['machine']['loadavg']} -> {report['loadavg_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
