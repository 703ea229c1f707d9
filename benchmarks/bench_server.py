"""Continuous batching, measured from outside: start `gguflm serve` on a free loopback
port, then time

* 4 streaming chat requests of 16 tokens, one after the other (the baseline), and
* 16 streaming chat requests of 16 tokens, all at once,

and report the ratio of the two wall times (the goal: < 2, where decoding the 16 one
by one would take ~4x). Requests are greedy and ask for long stories, so each produces
its 16 tokens (the token counts are checked through ``stream_options.include_usage``).
Each measurement is repeated ``--repeat`` times, alternating; the best (least disturbed
on a shared machine) and the median are reported, with the mean time to first token.

Before the server starts, the same model's batched decode step is timed in this process
for each width B of ``--widths`` (what one forward of the scheduler's decode costs:
B sequences in their own cache slots, prefilled to 20..59 tokens, one token per row per
step): ms per step (median and best of ``--steps``) and tokens/s.

    python benchmarks/bench_server.py [-m FILE.gguf] [--repeat 3] [--threads N] [--batch-rows N]
                                      [--widths 1,2,4,8,16,32,64] [--steps 16]

Writes benchmarks/results/<date>-cpu-server.json (with the machine's load average: other
work on a shared machine slows the two sides unevenly). Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from gguflm.models import resolve
from machine import cpu_model  # benchmarks/machine.py (this script's folder)

RESULTS = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
N_TOKENS = 16
SUBJECTS = ["a dragon", "the sea", "a robot", "a lighthouse", "a lost key", "a city at night", "a cat",
            "winter", "a train", "a garden", "the moon", "a library", "a storm", "a violin", "a desert", "a clock"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def sse_chunks(response: httpx.Response):
    """The JSON chunks of a streamed (server-sent events) completion, in order."""
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def stream_one(http: httpx.Client, url: str, subject: str) -> tuple[float, int]:
    """(seconds to the first content token, completion tokens) of one streamed request."""
    body = {"messages": [{"role": "user", "content": f"Write a long story about {subject}."}],
            "max_tokens": N_TOKENS, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0, ttft, n = time.perf_counter(), None, 0
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for chunk in sse_chunks(r):
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    return ttft or 0.0, n


def sequential(http: httpx.Client, url: str, k: int) -> dict:
    t0 = time.perf_counter()
    runs = [stream_one(http, url, SUBJECTS[i]) for i in range(k)]
    return {"seconds": time.perf_counter() - t0, "tokens": sum(n for _, n in runs),
            "ttft_mean": statistics.mean(t for t, _ in runs)}


def concurrent(http: httpx.Client, url: str, k: int) -> dict:
    with ThreadPoolExecutor(k) as pool:
        t0 = time.perf_counter()
        runs = list(pool.map(lambda s: stream_one(http, url, s), SUBJECTS[:k]))
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": sum(n for _, n in runs), "ttft_mean": statistics.mean(t for t, _ in runs)}


def decode_steps(model_path: Path, widths: Sequence[int], threads: int | None, steps: int) -> dict:
    """Per width B: ms per batched decode step (median, best of ``steps`` after one warm-up
    step) and tokens/s at the median, in this process (see the module doc)."""
    import torch

    import gguflm

    model = gguflm.load(model_path, threads=threads).model
    n_vocab, g = model.config.n_vocab, torch.Generator().manual_seed(0)
    out = {}
    for B in widths:
        lengths = [20 + (7 * b) % 40 for b in range(B)]                      # 20..59 tokens
        cache = model.new_cache(B, n_ctx=max(lengths) + steps + 1)
        for b, n in enumerate(lengths):                                      # prefill slot b
            model.forward(torch.randint(0, n_vocab, (1, n), generator=g), torch.arange(n)[None], cache,
                          torch.tensor([b]), last_only=True)
        positions, slots, times = torch.tensor(lengths)[:, None], torch.arange(B), []
        for _ in range(steps + 1):
            tokens = torch.randint(0, n_vocab, (B, 1), generator=g)
            t0 = time.perf_counter()
            model.forward(tokens, positions, cache, slots, last_only=True)    # [B, V]: the scheduler's call
            times.append(time.perf_counter() - t0)
            positions = positions + 1
        med, best = statistics.median(times[1:]), min(times[1:])
        out[str(B)] = {"ms_per_step_median": med * 1e3, "ms_per_step_best": best * 1e3, "tokens_per_s": B / med}
        print(f"decode step B={B:3d}: {med * 1e3:7.2f} ms (best {best * 1e3:7.2f}), {B / med:6.1f} tok/s", flush=True)
    return {"threads": torch.get_num_threads(), "steps": steps, "prefilled_tokens": "20..59", "widths": out}


def start_server(model: Path, threads: int | None, batch_rows: int | None, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gguflm", "serve", "-m", str(model), "--host", HOST, "--port", str(port),
           "--parallel", "16", "-c", "512", "--log-level", "warning"]
    if threads:
        cmd += ["--threads", str(threads)]
    if batch_rows:
        cmd += ["--batch-rows", str(batch_rows)]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit(f"gguflm serve exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.25)
    proc.kill()
    sys.exit("gguflm serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="server CPU threads (default: torch's choice)")
    ap.add_argument("--batch-rows", type=int, default=None, help="gguflm serve --batch-rows (default: its own)")
    ap.add_argument("--widths", default="1,2,4,8,16,32,64", help="decode step widths to time ('' for none)")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per width")
    args = ap.parse_args()
    model = resolve(args.model)
    load_before = os.getloadavg()
    steps = decode_steps(model, [int(b) for b in args.widths.split(",") if b], args.threads, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(model, args.threads, args.batch_rows, Path(tmp) / "serve.log")
        try:
            with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=32)) as http:
                stream_one(http, url, "warm-up")
                seq, conc = [], []
                for _ in range(args.repeat):
                    seq.append(sequential(http, url, 4))
                    conc.append(concurrent(http, url, 16))
        finally:
            proc.terminate()
            proc.wait(30)
    for runs, k in ((seq, 4), (conc, 16)):
        bad = [r["tokens"] for r in runs if r["tokens"] != k * N_TOKENS]
        if bad:
            sys.exit(f"expected {k * N_TOKENS} tokens per run, got {bad}")
    best_seq, best_conc = min(r["seconds"] for r in seq), min(r["seconds"] for r in conc)
    med_seq, med_conc = statistics.median(r["seconds"] for r in seq), statistics.median(r["seconds"] for r in conc)
    result = {
        "date": dt.date.today().isoformat(), "cpu": cpu_model(), "model": model.name, "threads": args.threads,
        "batch_rows": args.batch_rows,
        "tokens_per_request": N_TOKENS, "repeat": args.repeat,
        "sequential_4": {"best_s": best_seq, "median_s": med_seq, "runs": seq,
                         "tokens_per_s": 4 * N_TOKENS / best_seq},
        "concurrent_16": {"best_s": best_conc, "median_s": med_conc, "runs": conc,
                          "tokens_per_s": 16 * N_TOKENS / best_conc},
        "ratio_best": best_conc / best_seq, "ratio_median": med_conc / med_seq,
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],  # others' work on the machine
        "decode_step": steps,
    }
    print(f"4 sequential x {N_TOKENS} tokens: best {best_seq:.2f}s (median {med_seq:.2f}s), "
          f"{4 * N_TOKENS / best_seq:.1f} tok/s")
    print(f"16 concurrent x {N_TOKENS} tokens: best {best_conc:.2f}s (median {med_conc:.2f}s), "
          f"{16 * N_TOKENS / best_conc:.1f} tok/s")
    print(f"ratio 16 concurrent / 4 sequential: {result['ratio_best']:.2f} best, {result['ratio_median']:.2f} median "
          f"(goal < 2)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{result['date']}-cpu-server.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
