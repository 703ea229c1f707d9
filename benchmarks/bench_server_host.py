"""The server's host ceiling: `gguflm serve`'s real app, uvicorn, HTTP and scheduler over a
stand-in model whose forward costs almost nothing, so that everything measured is host
work (issue 17: at 32 streams x 256 tokens the GPU step takes ~2.95 ms on an H200, so
10k tok/s end to end needs the host's work per step, which overlaps the next step when
the scheduler runs ahead, to stay under ~3 ms: < ~100 us per token, HTTP included).

The stand-in (:class:`StandIn`) answers the scheduler's calls as the CUDA model does
(contiguous cache, batch invariant, mixed steps; the scheduler runs ahead as on CUDA,
``--no-pipeline``: reads every step at once, as when a request asks for logprobs or
penalties) with logits that choose, at position ``p``, token ``SEQ[p % len(SEQ)]``: the
model file's own tokenizer's ids (default SmolLM2; any GGUF with a tokenizer, e.g. the
TinyLlama-shape file) of a varied English text with accents, CJK and an emoji (tokens of
id >= ``WIDTH`` are fed as their single-byte tokens, so some characters arrive split over
several tokens), so detokenizing, UTF-8 assembly and the SSE chunks do real work. The
logits are ``WIDTH`` (4096) wide, not the vocabulary's: the greedy pick over a row (a
device op on the GPU) then costs ~4 us a row on the CPU instead of ~45 (SmolLM2's 49152);
``stand_in_ms`` reports what the stand-in's forward costs per step.

Two regimes: ``--step-ms 0`` (default), the host ceiling: steps follow each other as fast
as the host goes; ``--step-ms T``, a simulated device: every forward joins a queue of
steps of ``T`` ms, and reading a step's ids waits for it without the GIL (as a CUDA
event's ``synchronize``): does the host's work fit inside the device's steps (step wall
time == T), and what e2e does that give (2.95: the H200's 32-row step; 0.88: its one-row
step)?

The client: every stream's request at once, from one process of its own running asyncio
over raw sockets (a parser of chunked HTTP and SSE, ~10 us a chunk; ``--client httpx``:
bench_server_cuda's ``stream_one`` with httpx, one process per stream, heavier), the same
body as bench_server_cuda (chat, greedy, ``ignore_eos``, ``include_usage``). Each stream's
text is checked against the stand-in's (prompt length from its usage chunk), and its
token count. Reported per round: end-to-end tok/s (completion tokens / first request
sent to last chunk received), TTFT p50, content chunks per stream (fewer than tokens
where the event loop fell behind and joined pieces), and from the server: scheduler
steps, the step's wall time (``Scheduler._step``: accept, detokenize, emit, launch, the
stand-in, the simulated device's wait), the CPU seconds of the scheduler's thread and of
the HTTP thread (event loop: SSE chunks, JSON, sockets), per step and per token.
``--profile N``: py-spy samples the server during N more rounds (``--gil``: only the
thread holding the GIL) and the functions and lines taking most samples are printed.

    flock /tmp/bench.lock python benchmarks/bench_server_host.py [-m GGUF] [--streams 32] [--tokens 256]
        [--rounds 3] [--step-ms T] [--no-pipeline] [--profile ROUNDS [--gil]] [--json OUT]

One run takes 5-10 s. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
WIDTH = 4096   # columns of the stand-in's logits (every token it chooses is below)
SUBJECTS = ["the sea", "a lighthouse", "winter", "a clockmaker", "the moon", "bread", "a violin", "rivers",
            "glass", "a library", "trains", "bees", "salt", "a bridge", "snow", "maps"]
TEXT = (
    "Once upon a time, in a small café by the harbour, a clockmaker named Zoë repaired the town's "
    "old lighthouse clock. Every morning she walked along the pier — past the fishermen, the gulls and "
    "the naïve tourists who asked whether the sea was always this grey — and every evening she wound "
    "the great spring by hand. \"Time is patient,\" she liked to say, \"but springs are not.\" "
    "One winter a letter arrived from Kyoto (京都), written on thin paper that smelled of cedar: "
    "a student wanted to learn her craft. She answered at once, in careful, slightly crooked letters, "
    "and added a drawing of the gears 🙂. The student came in spring with a violin, three maps and "
    "a jar of salt from the mountains; together they rebuilt the escapement, measured each tooth to "
    "a tenth of a millimetre, and argued about whether 3.14159 or 22/7 was good enough for a wheel. "
    "By summer the clock kept time to within two seconds a week, the café served crème brûlée on "
    "Sundays, and the lighthouse keeper — who had never once been late — said, smiling, that the "
    "town finally sounded the way it should. Years later, when people asked Zoë what she had taught, "
    "she said: patience, oil, and knowing when to stop turning the key. ")


# ---- the stand-in model (server process) ---------------------------------------------------
def token_sequence(tokenizer, width: int = WIDTH) -> list[int]:
    """``TEXT``'s token ids, those of id >= ``width`` replaced by their bytes' single-byte tokens."""
    byte_id: dict[int, int] = {}
    for i in range(width):
        piece = tokenizer.token_to_piece(i)
        if len(piece) == 1:
            byte_id.setdefault(piece[0], i)
    seq: list[int] = []
    for t in tokenizer.encode(TEXT, add_special=False, parse_special=False):
        seq += [t] if t < width else [byte_id[b] for b in tokenizer.token_to_piece(t)]
    assert not set(seq) & set(tokenizer.eog_ids) and max(seq) < width
    return seq


def expected_text(tokenizer, seq: list[int], n_prompt: int, n_tokens: int) -> str:
    """What a stream of ``n_tokens`` after a prompt of ``n_prompt`` tokens says."""
    ids = [seq[(n_prompt - 1 + i) % len(seq)] for i in range(n_tokens)]
    return b"".join(tokenizer.token_to_piece(t) for t in ids).decode("utf-8", errors="replace")


class StandIn:
    """The model as the scheduler sees the CUDA one (contiguous cache, batch invariant,
    mixed steps), computing nothing: the logits of a row at position ``p`` choose
    ``seq[p % len(seq)]`` (one 1.0 in a row of zeros, ``WIDTH`` wide)."""

    paged_cache = False
    batch_invariant = True
    row_kinds = False

    def __init__(self, real, seq: list[int], max_rows: int = 1024, step_s: float = 0.0):
        import torch

        self.file, self.config, self.n_ctx = real.file, real.config, real.n_ctx
        self.device = torch.device("cpu")
        self.seq = torch.tensor(seq)
        self._buf = torch.zeros(max_rows, WIDTH)
        self._hot: torch.Tensor | None = None   # the previous call's (rows, ids)
        self.seconds, self.calls = 0.0, 0
        self.step_s, self.busy_until = step_s, 0.0   # the simulated device: a queue of steps

    def wait(self, until: float) -> None:
        """(The simulated device.) Block until ``until``, without the GIL (as an event's
        ``synchronize`` on CUDA)."""
        left = until - time.perf_counter()
        if left > 0:
            time.sleep(left)

    def new_cache(self, n_slots, n_ctx=None, block_size=None, n_blocks=None):
        import torch

        from gguflm.model.kv_cache import KVCache

        return KVCache(1, n_slots, 1, n_ctx or self.n_ctx, 1, dtype=torch.float16, block_size=block_size,
                       n_blocks=n_blocks)

    def flat_steps_over(self, cache) -> bool:
        return True

    def pin_decode_width(self, cache) -> None:
        pass

    def set_batch_invariant(self, enable: bool) -> bool:
        return True

    def close(self) -> None:
        pass

    def _logits(self, positions):   # positions Long[R] -> [R, WIDTH]
        import torch

        t0 = time.perf_counter()
        n = positions.shape[0]
        out = self._buf[:n]
        if self._hot is not None:       # clear the previous call's ones
            rows, ids = self._hot
            self._buf[rows, ids] = 0.0
        rows, ids = torch.arange(n), self.seq[positions % self.seq.shape[0]]
        out[rows, ids] = 1.0
        self._hot = (rows, ids)
        now = time.perf_counter()
        self.seconds += now - t0
        self.calls += 1
        if self.step_s:   # the step joins the device's queue
            self.busy_until = max(now, self.busy_until) + self.step_s
        return out

    def forward(self, tokens, positions, cache, slots, last_only=False, select=None, n_decode=None, selected=None):
        if select is not None:
            return self._logits(positions.reshape(-1).index_select(0, select))
        last = (positions >= 0).sum(dim=1) - 1
        return self._logits(positions.gather(1, last[:, None]).reshape(-1))

    def decode_one(self, token, position, cache, slot):
        return self._logits(position.reshape(-1))


def serve(args) -> None:
    """(The server process.) `gguflm serve`'s own ``_serve`` over the stand-in, with a
    ``/bench/stats`` route: the scheduler's steps, their time, the threads' CPU time."""
    import gguflm
    import gguflm.server as server
    from gguflm.engine.scheduler import Scheduler
    from gguflm.server import SWITCH_INTERVAL

    sys.setswitchinterval(SWITCH_INTERVAL)
    llm = gguflm.load(args.model, n_ctx=args.ctx, threads=1)   # the stand-in's CPU ops are a GPU's device ops
    seq = token_sequence(llm.tokenizer)
    llm.model = StandIn(llm.model, seq, step_s=args.step_ms / 1e3)
    stand_in = llm.model
    if args.step_ms:   # reading a step's ids waits for the simulated device, as on CUDA
        from gguflm.engine import scheduler as sched_mod

        class Ready:
            def __init__(self) -> None:
                self.until = stand_in.busy_until

            def synchronize(self) -> None:
                stand_in.wait(self.until)

        flight_init, plain_read = sched_mod._Flight.__init__, sched_mod._read

        def init(self, *a, **kw) -> None:
            flight_init(self, *a, **kw)
            if self.host is not None:
                self.ready = Ready()

        def read(t):
            stand_in.wait(stand_in.busy_until)
            return plain_read(t)

        sched_mod._Flight.__init__, sched_mod._read = init, read
    steps = {"n": 0, "seconds": 0.0}
    main = threading.main_thread().ident

    def make_scheduler(model, parallel, batch_rows, kv_size, batch_invariant):
        sched = Scheduler(model, parallel, start=False, pipeline=not args.no_pipeline)
        if hasattr(sched, "events_after_launch"):
            sched.events_after_launch = args.step_ms > 0   # a simulated device runs steps on its own
        inner = sched._step

        def timed_step() -> None:
            t0 = time.perf_counter()
            inner()
            steps["seconds"] += time.perf_counter() - t0
            steps["n"] += 1

        sched._step = timed_step
        return sched

    def create_app(backend, **kw):
        app = real_create_app(backend, **kw)

        @app.get("/bench/stats")
        async def stats() -> dict:
            return {"steps": steps["n"], "step_seconds": steps["seconds"],
                    "stand_in_seconds": stand_in.seconds, "stand_in_calls": stand_in.calls,
                    "scheduler_cpu_s": time.clock_gettime(time.pthread_getcpuclockid(main)),
                    "http_cpu_s": time.thread_time(), "process_cpu_s": time.process_time()}

        return app

    if args.loop != "auto":   # uvicorn's event loop (auto: uvloop where installed)
        import uvicorn

        config = uvicorn.Config
        uvicorn.Config = lambda *a, **kw: config(*a, **kw, loop=args.loop)
    real_create_app = server.create_app
    server.make_scheduler, server.create_app = make_scheduler, create_app
    from gguflm.server.security import Security

    server._serve(llm, llm.file.path, HOST, args.port, args.parallel, 1 << 20, "warning", None, Security(HOST),
                  10.0)


# ---- the client (bench process) -----------------------------------------------------------
def request_body(subject: str, n_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Write a long story about {subject}."}],
            "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def stream_raw(port: int, subject: str, n_tokens: int) -> dict:
    """One streamed chat completion over a raw socket (HTTP/1.1, chunked SSE): the
    bench_server_cuda ``stream_one`` record (start, first, last, tokens, text, times)."""
    body = json.dumps(request_body(subject, n_tokens)).encode()
    t0 = time.time()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (HOST.encode(), port, len(body)) + body)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or b"transfer-encoding: chunked" not in head.lower():
        raise RuntimeError(f"unexpected answer: {head[:200]!r}")
    first = last = None
    n, text, times, usage = 0, [], [], None
    pending = b""
    done = False
    while not done:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if size == 0:
            break
        pending += (await reader.readexactly(size + 2))[:-2]
        *events, pending = pending.split(b"\n\n")
        for ev in events:
            if not ev.startswith(b"data: "):
                continue
            if ev == b"data: [DONE]":
                done = True
                continue
            chunk = json.loads(ev[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
                n = usage["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                last = time.time()
                first = first or last
                text.append(chunk["choices"][0]["delta"]["content"])
                times.append(last)
    writer.close()
    return {"start": t0, "first": first, "last": last, "tokens": n or len(times), "text": "".join(text),
            "times": times, "usage": usage}


def round_raw(port: int, streams: int, n_tokens: int, tag: str) -> list[dict]:
    async def all_streams():
        return await asyncio.gather(*(stream_raw(port, f"{SUBJECTS[i % 16]} ({tag}{i})", n_tokens)
                                      for i in range(streams)))

    try:
        import uvloop
        return uvloop.run(all_streams())
    except ImportError:
        return asyncio.run(all_streams())


def stream_httpx(args: tuple[str, str, int]) -> dict:
    """bench_server_cuda's ``stream_one`` (httpx, bench_server's SSE parser), keeping the usage."""
    import httpx

    from bench_server import sse_chunks

    url, subject, n_tokens = args
    t0 = time.time()
    first = last = usage = None
    text, times = [], []
    with httpx.Client(timeout=600) as http, http.stream("POST", url + "/v1/chat/completions",
                                                        json=request_body(subject, n_tokens)) as r:
        r.raise_for_status()
        for chunk in sse_chunks(r):
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                last = time.time()
                first = first or last
                text.append(chunk["choices"][0]["delta"]["content"])
                times.append(last)
    return {"start": t0, "first": first, "last": last, "tokens": usage["completion_tokens"] if usage else len(times),
            "text": "".join(text), "times": times, "usage": usage}


def round_httpx(url: str, streams: int, n_tokens: int, tag: str, pool) -> list[dict]:
    return list(pool.map(stream_httpx, [(url, f"{SUBJECTS[i % 16]} ({tag}{i})", n_tokens) for i in range(streams)]))


def check(runs: list[dict], tokenizer, seq: list[int], n_tokens: int) -> int:
    """Streams whose text and token count are the stand-in's."""
    good = 0
    for r in runs:
        u = r.get("usage")
        if u is None:
            continue
        good += r["tokens"] == n_tokens and r["text"] == expected_text(tokenizer, seq, u["prompt_tokens"], n_tokens)
    return good


def profile_top(raw: Path, n: int = 40) -> dict:
    """py-spy's collapsed stacks -> the functions with most samples (self, inclusive) and
    the lines with most samples of their own."""
    own, incl, lines, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for row in raw.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = []
        for f in stack.split(";"):
            name, _, where = f.partition(" (")
            file, _, line = where.rstrip(")").rpartition(":")
            frames.append((f"{name} ({file.rsplit('/', 1)[-1]})", line))
        own[frames[-1][0]] += c
        lines[f"{frames[-1][0]}:{frames[-1][1]}"] += c
        for f in {f for f, _ in frames}:
            incl[f] += c
    return {"samples": total, "self": own.most_common(n), "inclusive": incl.most_common(n),
            "lines": lines.most_common(n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m", help="GGUF whose tokenizer and template are used")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=32, help="server slots (default 32, also for --streams 1)")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="simulate a device: each forward takes this long, reading its ids waits for it "
                         "without the GIL (2.95: the H200's 32-row step; 0.88: its 1-row step)")
    ap.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"], help="uvicorn's event loop")
    ap.add_argument("--no-pipeline", action="store_true", help="the scheduler reads every step at once")
    ap.add_argument("--profile", type=int, default=0, metavar="ROUNDS",
                    help="py-spy ROUNDS more rounds, print the top functions")
    ap.add_argument("--gil", action="store_true", help="(--profile) sample only the thread holding the GIL")
    ap.add_argument("--profile-out", help="(--profile) keep py-spy's collapsed stacks here")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the server process
    args = ap.parse_args()
    from gguflm.models import resolve

    args.model = str(resolve(args.model))
    if args.serve:
        args.port = args.serve
        serve(args)
        return

    import httpx

    from bench_server import free_port

    from gguflm.gguf import GGUFFile
    from gguflm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(GGUFFile(args.model))
    seq = token_sequence(tokenizer)
    port = free_port()
    url = f"http://{HOST}:{port}"
    load_before = os.getloadavg()
    pool = None
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        cmd = [sys.executable, __file__, "--serve", str(port), "-m", args.model, "--parallel", str(args.parallel),
               "--ctx", str(args.ctx), "--step-ms", str(args.step_ms), "--loop", args.loop,
               *(["--no-pipeline"] if args.no_pipeline else [])]
        proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            for _ in range(600):
                if proc.poll() is not None:
                    sys.exit(f"server exited:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            if args.client == "httpx":
                from concurrent.futures import ProcessPoolExecutor

                pool = ProcessPoolExecutor(args.streams)

            def one_round(tag: str, n_tokens: int) -> tuple[list[dict], dict]:
                before = httpx.get(url + "/bench/stats").json()
                runs = (round_raw(port, args.streams, n_tokens, tag) if pool is None
                        else round_httpx(url, args.streams, n_tokens, tag, pool))
                after = httpx.get(url + "/bench/stats").json()
                return runs, {k: after[k] - before[k] for k in after}

            one_round("warm", 16)
            rounds = []
            for r in range(args.rounds):
                runs, st = one_round(f"r{r}-", args.tokens)
                total = sum(x["tokens"] for x in runs)
                wall = max(x["last"] for x in runs) - min(x["start"] for x in runs)
                ttft = statistics.median(x["first"] - x["start"] for x in runs)
                good = check(runs, tokenizer, seq, args.tokens)
                steps = max(st["steps"], 1)
                row = {"completion_tokens": total, "wall_s": wall, "e2e_tok_s": total / wall, "ttft_p50_ms": 1e3 * ttft,
                       "streams_ok": good, "content_chunks": sum(len(x["times"]) for x in runs),
                       "steps": st["steps"], "step_ms": 1e3 * st["step_seconds"] / steps,
                       "stand_in_ms": 1e3 * st["stand_in_seconds"] / steps,
                       "scheduler_cpu_ms_per_step": 1e3 * st["scheduler_cpu_s"] / steps,
                       "http_cpu_ms_per_step": 1e3 * st["http_cpu_s"] / steps,
                       "server_cpu_us_per_token": 1e6 * st["process_cpu_s"] / total,
                       "scheduler_cpu_us_per_token": 1e6 * st["scheduler_cpu_s"] / total,
                       "http_cpu_us_per_token": 1e6 * st["http_cpu_s"] / total}
                rounds.append(row)
                print(f"{args.streams} streams x {args.tokens}: {total / wall:7.0f} tok/s e2e ({wall:.2f} s), TTFT p50 "
                      f"{1e3 * ttft:5.0f} ms, {good}/{len(runs)} streams exact, "
                      f"{row['content_chunks'] / len(runs):.0f} chunks a stream; {st['steps']} steps, "
                      f"step {row['step_ms']:.3f} ms (stand-in {row['stand_in_ms']:.3f}); CPU per step: scheduler "
                      f"{row['scheduler_cpu_ms_per_step']:.3f} ms, HTTP {row['http_cpu_ms_per_step']:.3f} ms; "
                      f"per token: server {row['server_cpu_us_per_token']:.0f} us (scheduler "
                      f"{row['scheduler_cpu_us_per_token']:.0f}, HTTP {row['http_cpu_us_per_token']:.0f})", flush=True)
                if good != len(runs):
                    sys.exit("a stream's text or token count is not the stand-in's")
            prof = None
            if args.profile:
                spy = shutil.which("py-spy")
                if spy is None:
                    sys.exit("--profile needs py-spy (pip install py-spy)")
                raw = Path(tmp) / "profile.txt"
                rec = subprocess.Popen([spy, "record", "-p", str(proc.pid), "-r", "500", "-f", "raw", "-o", str(raw),
                                        "--threads", *(["--gil"] if args.gil else [])],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
                for r in range(args.profile):
                    one_round(f"p{r}-", args.tokens)
                rec.send_signal(2)
                rec.wait(60)
                prof = profile_top(raw)
                if args.profile_out:
                    shutil.copy(raw, args.profile_out)
                print(f"py-spy: {prof['samples']} samples{' (GIL holder only)' if args.gil else ''}")
                for kind in ("self", "inclusive", "lines"):
                    print(f"  top {kind}:")
                    for f, c in prof[kind]:
                        print(f"    {100 * c / prof['samples']:5.1f}%  {f}")
        finally:
            if pool is not None:
                pool.shutdown()
            proc.terminate()
            proc.wait(30)
    best = max(r["e2e_tok_s"] for r in rounds)
    med = statistics.median(r["e2e_tok_s"] for r in rounds)
    what = f"simulated {args.step_ms} ms device steps" if args.step_ms else "host ceiling"
    print(f"{what}: {args.streams} streams x {args.tokens} tokens: best {best:.0f} tok/s, median {med:.0f} "
          f"(load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "streams": args.streams, "tokens": args.tokens, "parallel": args.parallel, "client": args.client,
            "pipeline": not args.no_pipeline, "step_ms": args.step_ms, "loop": args.loop, "cpus": os.cpu_count(),
            "load_average_before_after": [load_before[0], os.getloadavg()[0]],
            "best_e2e_tok_s": best, "median_e2e_tok_s": med, "rounds": rounds, "profile": prof}, indent=2) + "\n")


if __name__ == "__main__":
    main()
