"""Aggregate decode throughput of continuous batching on the GPU (issue 8's H100 run).

1. In process: the model's batched decode step (``Model.forward`` of B rows, one token
   each, in B cache slots at their own positions), B = 1, 2, 4, ..., as the scheduler
   calls it, plus the greedy pick and its read to the host per step:
   rows x steps / seconds.
2. Over HTTP: ``gguflm serve --device cuda --parallel N``, N concurrent streaming chat
   completions of T tokens each (temperature 0, ``ignore_eos`` so every stream runs to
   T), each client in its own process. Reported: completion tokens / wall time of the
   round (prefill included), and the decode rate: the sum over streams of
   (tokens - 1) / (last chunk - first chunk), and the steady rate: tokens produced while
   all N streams are decoding (from the last stream's first token to the first stream's
   end; chunk times, scaled by each stream's tokens per chunk) / that window. Then every
   stream's prompt again, alone on the same server: is its greedy text the one it got
   among the others (``identical_streams``), and the lone request's decode rate.
3. With ``--llama-server BIN``: the same client load against llama-server
   (``-ngl 99 -fa on --parallel N -cb``, the same context per slot), same run.
4. ``generate()``'s decode rate for one request (the lone-request target's reference).

``--kv-size N``: the paged KV cache (opt-in on the GPU): the step sweep runs over a pool
of blocks of 16 and the server gets ``--kv-size N`` (the default contiguous cache
otherwise).

``GGUFLM_CUDA_DECODE_ROWS=gemv`` in the environment (the in-process step sweep and the
server inherit it; recorded as ``decode_rows``): the batched step's decode rows through
the rows GEMV instead of the GEMM (opt-in, model/cuda/batched.py). Compare a run with and
one without it on the same card: e2e tok/s, TTFT p50, identical_streams, lone_request_tps.

    python benchmarks/bench_server_cuda.py -m tinyllama-Q4_K_M.gguf [--streams 32] [--tokens 256] \\
        [--rounds 3] [--llama-server build/bin/llama-server] [--kv-size N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench_server import HOST, free_port, sse_chunks

SUBJECTS = ["the sea", "a lighthouse", "winter", "a clockmaker", "the moon", "bread", "a violin", "rivers",
            "glass", "a library", "trains", "bees", "salt", "a bridge", "snow", "maps"]


def step_sweep(model_path: str, widths: list[int], steps: int, n_ctx: int, kv_size: int | None = None) -> list[dict]:
    """Rows x steps / seconds of the batched decode step for each width (warm graphs);
    ``kv_size``: over a paged cache of that many positions (blocks of 16)."""
    import torch

    import gguflm

    m = gguflm.load(model_path, device="cuda", n_ctx=n_ctx).model
    if kv_size is None:
        cache = m.new_cache(max(widths), n_ctx)
    else:
        cache = m.new_cache(max(widths), n_ctx, block_size=16, n_blocks=-(-kv_size // 16))
    gen = torch.Generator().manual_seed(0)
    prompt_len = 32
    rows = []
    for b in widths:
        slots = torch.arange(b, device="cuda")
        last = []
        for s in range(b):  # each slot: its own 32-token prompt
            ids = torch.randint(3, m.config.n_vocab, (1, prompt_len), generator=gen).cuda()
            if not cache.reserve(s, prompt_len + steps + 4):
                raise SystemExit(f"--kv-size {kv_size} cannot hold {b} rows of {prompt_len + steps + 4} positions")
            logits = m.forward(ids, torch.arange(prompt_len, device="cuda")[None], cache, slots[s:s + 1],
                               last_only=True)
            last.append(int(logits[0].argmax()))
        tok = torch.tensor(last, device="cuda")[:, None]
        pos = torch.full((b, 1), prompt_len, device="cuda")
        for i in range(steps + 3):
            if i == 3:  # after the capture and two warm replays
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            logits = m.forward(tok, pos, cache, slots, last_only=True)
            picked = torch.argmax(logits, dim=-1)
            tok = torch.tensor(picked.tolist(), device="cuda")[:, None]   # the scheduler's one read per step
            pos = pos + 1
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append({"rows": b, "steps": steps, "ms_per_step": 1e3 * dt / steps, "tok_s": b * steps / dt})
        print(f"batched step B={b:3d}: {1e3 * dt / steps:7.3f} ms/step  {b * steps / dt:9.0f} tok/s", flush=True)
    return rows


def stream_one(args: tuple[str, str, int]) -> dict:
    """One streamed chat completion: wall-clock times of its start, first and last content
    chunk, its completion tokens (the usage chunk, else one per content chunk) and text."""
    import httpx

    url, subject, n_tokens = args
    body = {"messages": [{"role": "user", "content": f"Write a long story about {subject}."}],
            "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.time()
    first = last = None
    n = 0
    text, times = [], []
    with httpx.Client(timeout=600) as http, http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for chunk in sse_chunks(r):
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                last = time.time()
                first = first or last
                text.append(chunk["choices"][0]["delta"]["content"])
                times.append(last)
    return {"start": t0, "first": first, "last": last, "tokens": n or len(times), "text": "".join(text),
            "times": times}


def steady_rate(runs: list[dict]) -> float:
    """Tokens per second over the window in which every stream is decoding."""
    lo, hi = max(r["first"] for r in runs), min(r["last"] for r in runs)
    if hi <= lo:
        return float("nan")
    made = sum(sum(lo < t <= hi for t in r["times"]) * r["tokens"] / len(r["times"]) for r in runs)
    return made / (hi - lo)


def server_command(kind: str, model_path: str, port: int, streams: int, n_ctx: int, llama_server: str | None,
                   kv_size: int | None = None):
    if kind == "gguflm":
        return [sys.executable, "-m", "gguflm", "serve", "-m", model_path, "--device", "cuda", "--host", HOST,
                "--port", str(port), "--parallel", str(streams), "-c", str(n_ctx), "--log-level", "warning",
                *(["--kv-size", str(kv_size)] if kv_size is not None else [])]
    # llama-server: -c is the whole KV cache, split between the --parallel slots
    return [llama_server, "-m", model_path, "-ngl", "99", "-fa", "on", "--parallel", str(streams), "-cb",
            "-c", str(n_ctx * streams), "--host", HOST, "--port", str(port), "--no-webui"]


def http_rounds(kind: str, model_path: str, streams: int, tokens: int, rounds: int, n_ctx: int,
                llama_server: str | None = None, kv_size: int | None = None) -> dict:
    """``streams`` concurrent streams against one server (``kind``: gguflm or llama-server),
    ``rounds`` times; then each stream's request again, alone on the same server: its text
    (greedy) must be the one it got among the others; then one lone request's decode rate."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        cmd = server_command(kind, model_path, port, streams, n_ctx, llama_server, kv_size)
        proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            import httpx

            for _ in range(2400):
                if proc.poll() is not None:
                    sys.exit(f"{kind} server exited:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
            results = []
            with ProcessPoolExecutor(streams) as pool:
                stream_one((url, "warm-up", 8))
                list(pool.map(stream_one, [(url, SUBJECTS[i % 16], 16) for i in range(streams)]))  # warm widths
                for _ in range(rounds):
                    runs = list(pool.map(stream_one, [(url, f"{SUBJECTS[i % 16]} ({i})", tokens)
                                                      for i in range(streams)]))
                    total = sum(r["tokens"] for r in runs)
                    wall = max(r["last"] for r in runs) - min(r["start"] for r in runs)
                    decode = sum((r["tokens"] - 1) / (r["last"] - r["first"]) for r in runs)
                    steady = steady_rate(runs)
                    ttft = sorted(r["first"] - r["start"] for r in runs)
                    results.append({"completion_tokens": total, "wall_s": wall, "end_to_end_tok_s": total / wall,
                                    "decode_tok_s": decode, "steady_decode_tok_s": steady,
                                    "ttft_mean_s": statistics.mean(ttft), "ttft_p50_s": statistics.median(ttft)})
                    print(f"{kind}: {streams} streams x {tokens}: {total} tokens in {wall:.2f} s = "
                          f"{total / wall:.0f} tok/s end to end, decode {decode:.0f} tok/s, all decoding "
                          f"{steady:.0f} tok/s, TTFT p50 {1e3 * statistics.median(ttft):.0f} ms", flush=True)
            alone = []
            for i in range(streams):
                solo = stream_one((url, f"{SUBJECTS[i % 16]} ({i})", tokens))
                together = runs[i]["text"]
                same = next((k for k, (a, b) in enumerate(zip(solo["text"], together)) if a != b),
                            min(len(solo["text"]), len(together)))
                alone.append({"stream": i, "identical": solo["text"] == together, "common_prefix_chars": same,
                              "chars": len(together),
                              "lone_decode_tok_s": (solo["tokens"] - 1) / (solo["last"] - solo["first"])})
            n_same = sum(a["identical"] for a in alone)
            lone = statistics.median(a["lone_decode_tok_s"] for a in alone)
            print(f"{kind}: alone == among {streams}: {n_same}/{streams}; lone request decode {lone:.0f} tok/s",
                  flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
            tail = log.read_text()[-2000:]
    return {"server": kind, "streams": streams, "tokens": tokens, "rounds": results, "alone_vs_batched": alone,
            "identical_streams": n_same, "lone_request_tps": lone, "server_log_tail": tail}


def generate_tps(model_path: str, tokens: int) -> float:
    """Decode tok/s of one request through ``gguflm.load(...).generate()`` (the user's path)."""
    import gguflm

    m = gguflm.load(model_path, device="cuda")
    for _ in m.generate("Once upon a time", max_tokens=16, temperature=0, ignore_eos=True):
        pass
    t0 = None
    n = 0
    for _ in m.generate("Write a long story about the sea.", max_tokens=tokens, temperature=0, ignore_eos=True):
        n += 1
        if t0 is None:
            t0 = time.perf_counter()
            n = 0
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("-c", "--ctx", type=int, default=1024, help="context per stream")
    ap.add_argument("--llama-server", help="llama-server binary: the same client load against it, same run")
    ap.add_argument("--kv-size", type=int, default=None, help="the paged KV cache (opt-in on the GPU) of N positions")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch

    out = {"date": time.strftime("%Y-%m-%d"), "card": torch.cuda.get_device_name(), "model": os.path.basename(a.model),
           "script": "benchmarks/bench_server_cuda.py", "kv_size": a.kv_size,
           "decode_rows": os.environ.get("GGUFLM_CUDA_DECODE_ROWS", "") or "gemm"}
    widths = [w for w in (1, 2, 4, 8, 16, 32, 64) if w <= max(64, a.streams)]
    if not a.skip_steps:
        out["step_sweep"] = step_sweep(a.model, widths, a.steps, a.ctx, a.kv_size)
        torch.cuda.empty_cache()
    if not a.skip_http:
        ours = out["http"] = http_rounds("gguflm", a.model, a.streams, a.tokens, a.rounds, a.ctx, kv_size=a.kv_size)
        row = {"ours_e2e_tps": max(r["end_to_end_tok_s"] for r in ours["rounds"]),
               "ours_ttft_p50_ms": 1e3 * min(r["ttft_p50_s"] for r in ours["rounds"]),
               "lone_request_tps": ours["lone_request_tps"],
               "identical_streams": f"{ours['identical_streams']}/{a.streams}", "decode_rows": out["decode_rows"]}
        if a.llama_server:
            theirs = out["http_llama_server"] = http_rounds("llama-server", a.model, a.streams, a.tokens, a.rounds,
                                                            a.ctx, a.llama_server)
            row["llama_server_e2e_tps"] = max(r["end_to_end_tok_s"] for r in theirs["rounds"])
            row["llama_server_ttft_p50_ms"] = 1e3 * min(r["ttft_p50_s"] for r in theirs["rounds"])
            row["llama_server_identical_streams"] = f"{theirs['identical_streams']}/{a.streams}"
            row["e2e_ratio"] = row["ours_e2e_tps"] / row["llama_server_e2e_tps"]
        row["generate_tps"] = generate_tps(a.model, a.tokens)
        row["lone_vs_generate"] = row["lone_request_tps"] / row["generate_tps"]
        out["rows"] = [row]
        print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
