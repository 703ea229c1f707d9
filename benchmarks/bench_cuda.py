"""gguflm vs llama.cpp on one NVIDIA GPU: prefill (pp512) and decode (tg128) speed and
peak VRAM, per quantization of the same model; writes the rows of
``benchmarks/results/<date>-<card>.json``.

llama.cpp: ``llama-bench -m FILE -ngl 99 -fa 1 -p 512 -n 128 -r 5 -o json``.
gguflm:    ``python -m gguflm bench -m FILE --device cuda -p 512 -n 128 -d D -r 5 --json``: through
           the generation loop (``generate()``'s path); pp512 of fresh prompts (new tokens; the
           prompt length's graph replayed) and of the first prompt of its length (its graph
           captured) apart; cold start in a fresh process.
VRAM: the device's ``memory.used`` (nvidia-smi, every 50 ms) at its peak during the
run, minus its value before the run: the process's whole footprint (CUDA context,
weights, caches, workspaces), measured the same way for both.

    python benchmarks/bench_cuda.py --models Q4_K_M=tinyllama-Q4_K_M.gguf Q4_0=... \\
        --llama-bench build/bin/llama-bench --out results.json [--ours-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import threading
import time


def gpu_memory_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def card_name() -> str:
    return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]


def run_with_peak_memory(cmd: list[str], timeout: float) -> tuple[str, int]:
    """Run ``cmd``; its stdout and the peak device memory it added (MiB)."""
    base = gpu_memory_mib()
    peak = [base]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], gpu_memory_mib())
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        done.set()
        t.join()
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr[-2000:]}")
    sys.stderr.write(r.stderr[-1500:])
    return r.stdout, peak[0] - base


def llama_bench(binary: str, path: str, p: int, n: int, reps: int, depth: int = 0) -> dict:
    out, vram = run_with_peak_memory([binary, "-m", path, "-ngl", "99", "-fa", "1", "-p", str(p), "-n", str(n),
                                      "-d", f"0,{depth}" if depth else "0", "-r", str(reps), "-o", "json"],
                                     timeout=900)
    res = {"vram_mb": vram}
    for test in json.loads(out):
        key = "pp" if test["n_prompt"] and not test["n_gen"] else "tg"
        if test.get("n_depth"):
            key += "_depth"
        res[f"{key}_tps"], res[f"{key}_sd"] = test["avg_ts"], test["stddev_ts"]
        res["build"] = f"{test.get('build_commit', '?')} ({test.get('build_number', '?')})"
    return res


def ours(path: str, p: int, n: int, reps: int, depth: int = 0) -> dict:
    out, vram = run_with_peak_memory([sys.executable, "-m", "gguflm", "bench", "-m", path, "--device", "cuda",
                                      "-p", str(p), "-n", str(n), "-d", str(depth), "-r", str(reps), "--ceiling",
                                      "--json"], timeout=900)
    sys.stdout.write(out)
    res = json.loads(out.strip().splitlines()[-1])
    res["vram_mb"] = vram
    return res


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser()
    a.add_argument("--models", nargs="+", required=True, help="QUANT=PATH pairs")
    a.add_argument("--llama-bench", help="llama-bench binary (omit with --ours-only)")
    a.add_argument("--ours-only", action="store_true")
    a.add_argument("-p", type=int, default=512)
    a.add_argument("-n", type=int, default=128)
    a.add_argument("-r", type=int, default=5)
    a.add_argument("-d", type=int, default=4096, help="context depth of the second decode figure (0: none)")
    a.add_argument("--out", required=True)
    args = a.parse_args(argv)
    import torch
    import triton

    card = card_name()
    rows = []
    for spec in args.models:
        quant, path = spec.split("=", 1)
        row = {"device": "cuda", "card": card, "model": "tinyllama-1.1b-random", "quant": quant}
        row["path"] = "generate"
        o = ours(path, args.p, args.n, args.r, args.d)
        row.update(ours_tg128=o["tg_tps"], ours_tg128_sd=o["tg_sd"], ours_pp512_fresh=o["pp_tps"],
                   ours_pp512_fresh_sd=o["pp_sd"], ours_pp512_first_of_length=o.get("pp_first_tps"),
                   ours_tg128_depth4096=o.get("tg_depth_tps"), ours_tg128_ceiling=o.get("tg_ceiling_tps"),
                   ours_cold_start_s=o.get("cold_start_s"),
                   ours_cold_start_empty_cache_s=o.get("cold_start_empty_cache_s"),
                   ours_vram_mb=o["vram_mb"], ours_torch_peak_mb=o["peak_mem_mb"])
        row["ours_pp512"] = row["ours_pp512_fresh"]
        if not args.ours_only:
            ll = llama_bench(args.llama_bench, path, args.p, args.n, args.r, args.d)
            row.update(llama_cpp_tg128=ll["tg_tps"], llama_cpp_tg128_sd=ll["tg_sd"], llama_cpp_pp512=ll["pp_tps"],
                       llama_cpp_pp512_sd=ll["pp_sd"], llama_cpp_tg128_depth4096=ll.get("tg_depth_tps"),
                       llama_cpp_vram_mb=ll["vram_mb"], llama_cpp_build=ll["build"])
            row.update(tg_ratio=row["ours_tg128"] / row["llama_cpp_tg128"],
                       pp_ratio=row["ours_pp512"] / row["llama_cpp_pp512"],
                       vram_ratio=row["ours_vram_mb"] / row["llama_cpp_vram_mb"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "card": card, "torch": torch.__version__,
            "triton": triton.__version__, "script": "benchmarks/bench_cuda.py",
            "settings": {"p": args.p, "n": args.n, "r": args.r}}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n| quant | ours tg{args.n} | llama.cpp tg{args.n} | ratio | ours pp{args.p} | llama.cpp pp{args.p} | "
          f"ratio | VRAM ours / llama.cpp (MiB) |")
    for r in rows:
        print(f"| {r['quant']} | {r['ours_tg128']:.0f} | {r.get('llama_cpp_tg128', float('nan')):.0f} | "
              f"{r.get('tg_ratio', float('nan')):.2f} | {r['ours_pp512']:.0f} | {r.get('llama_cpp_pp512', float('nan')):.0f} | "
              f"{r.get('pp_ratio', float('nan')):.2f} | {r['ours_vram_mb']} / {r.get('llama_cpp_vram_mb', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
