"""Beyond one process, measured on this machine (docs/scaling.md), in one run:

* tensor parallel: greedy decode tok/s of one prompt through ``generate()`` at tp=1 (the
  normal engine: the C++ block step) and tp=N (N processes over gloo, torch blocks with
  one all-reduce per attention and FFN), for the TinyLlama-1.1B-shape Q4_K_M file
  (32 / 4 heads: tp=2) and SmolLM2 (9 / 3 heads: tp=3); with each rank's weight bytes
  read from the map and model pages resident, against one process's;
* replicas: ``gguflm serve --replicas R`` (local Ray Serve) for R = 1 and 2, the same 16
  concurrent /v1/completions requests (``--tokens`` each, ignore_eos, greedy): aggregate
  generated tok/s and the ratio of 2 replicas to 1.

    python benchmarks/bench_scaling.py [--tokens 32] [--repeat 2] [--skip-tp] [--skip-replicas]

Writes benchmarks/results/<date>-cpu-scaling.json, with the load average before and after
each part: on a shared machine other work slows the sides unevenly (say so with the numbers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from gguflm.models import resolve
from machine import cpu_model  # benchmarks/machine.py (this script's folder)

RESULTS = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
TINYLLAMA = Path.home() / ".cache" / "gguflm-bench" / "tinyllama-shape-Q4_K_M.gguf"
PROMPT = "Once upon a time, in a land far away,"
STREAMS = 16


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def decode_rate(path: Path, tp: int, tokens: int, repeat: int) -> dict:
    """Best and all decode tok/s of ``tokens`` greedy tokens at tensor parallel ``tp``."""
    import torch

    import gguflm
    from gguflm.engine.sampling import SamplingParams
    from gguflm.model.parallel import memory

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    llm = gguflm.load(path, n_ctx=256, tp=tp)
    load_s = time.perf_counter() - t0
    try:
        rates = []
        ids = llm.encode_prompt(PROMPT)
        for i in range(repeat + 1):  # the first is a warm-up
            s = llm.stream(ids, max_tokens=tokens, params=SamplingParams(temperature=0.0), ignore_eos=True)
            for _ in s:
                pass
            r = s.result
            if i:
                rates.append(round((r.n_generated - 1) / r.decode_seconds, 2))
        stats = llm.model.stats() if tp > 1 else [{**memory(path), "bytes_read": None, "whole_bytes": None}]
    finally:
        llm.close()
        torch.set_num_threads(threads)
    return {"model": path.name, "tp": tp, "load_s": round(load_s, 1), "decode_tok_s": rates,
            "best_tok_s": max(rates), "ranks": stats}


def _port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=10)
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def _burst(url: str, tokens: int) -> dict:
    def one(i: int) -> int:
        r = httpx.post(url + "/v1/completions", timeout=600, json={
            "prompt": f"Story number {i}: {PROMPT}", "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(STREAMS) as pool:
        n = sum(pool.map(one, range(STREAMS)))
    wall = time.perf_counter() - t0
    return {"tokens": n, "wall_s": round(wall, 2), "tok_s": round(n / wall, 2)}


def replicas_rate(path: Path, replicas: int, tokens: int, repeat: int) -> dict:
    port = _port()
    cmd = [sys.executable, "-m", "gguflm", "serve", "-m", str(path), "--replicas", str(replicas), "--host", HOST,
           "--port", str(port), "--parallel", str(STREAMS // replicas), "-c", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        t0 = time.perf_counter()
        _wait(url, proc)
        start_s = time.perf_counter() - t0
        _burst(url, 4)  # warm every replica
        runs = [_burst(url, tokens) for _ in range(repeat)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"replicas": replicas, "parallel_per_replica": STREAMS // replicas,
            "threads_per_replica": max(1, (os.cpu_count() or 1) // replicas), "start_s": round(start_s, 1),
            "runs": runs, "best_tok_s": max(r["tok_s"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-tp", action="store_true")
    ap.add_argument("--skip-replicas", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / f"{dt.date.today()}-cpu-scaling.json")
    args = ap.parse_args()
    smollm2 = resolve("smollm2-135m")
    out = {"date": str(dt.date.today()), "cpu": cpu_model(), "cores": os.cpu_count(), "tokens": args.tokens,
           "note": "a shared 2-core machine: other work ran during the measurement (load average recorded)"}
    if not args.skip_tp:
        out["tp_load_before"] = _load()
        cases = [(smollm2, 1), (smollm2, 3)]
        if TINYLLAMA.exists():
            cases = [(TINYLLAMA, 1), (TINYLLAMA, 2)] + cases
        out["tensor_parallel"] = []
        for path, tp in cases:
            r = decode_rate(path, tp, args.tokens, args.repeat)
            print(json.dumps({k: v for k, v in r.items() if k != "ranks"}), flush=True)
            out["tensor_parallel"].append(r)
        out["tp_load_after"] = _load()
    if not args.skip_replicas:
        out["replicas_load_before"] = _load()
        runs = []
        for n in (1, 2):
            r = replicas_rate(smollm2, n, args.tokens, args.repeat)
            print(json.dumps(r), flush=True)
            runs.append(r)
        out["replicas"] = {"model": smollm2.name, "streams": STREAMS, "runs": runs,
                           "ratio_2_to_1": round(runs[1]["best_tok_s"] / runs[0]["best_tok_s"], 3)}
        out["replicas_load_after"] = _load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
