"""Continuous batching seen from outside: concurrent requests are decoded together (the
server reports many busy slots at once), a request's greedy answer is the same alone and
among 15 others, 16 concurrent streams take far less than 4x the time of 4 sequential
ones, requests beyond the slots wait and are all served, and a client that disconnects
frees its slot at once."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx

N_TOKENS = 16
# 16 requests served one after another take 4x the time of 4; the goal for batching is
# < 2x (benchmarks/bench_server.py measures it). The test asserts a generous 3.5x: it
# must catch a server that serializes requests, not flake on a busy 2-core machine.
THROUGHPUT_LIMIT = 3.5


def stream_chat(client, question: str, max_tokens: int = N_TOKENS) -> str:
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


class HealthWatcher:
    """Polls /health in the background; records the most busy slots and waiting requests seen."""

    def __init__(self, server):
        self.server, self.max_busy, self.max_waiting = server, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                h = http.get(self.server.url + "/health").json()
                self.max_busy = max(self.max_busy, h["slots_processing"])
                self.max_waiting = max(self.max_waiting, h["requests_waiting"])
                self._stop.wait(0.05)

    def __enter__(self) -> HealthWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_batched_greedy_equals_alone_and_throughput(server, client, questions) -> None:
    server.wait_idle()
    t0 = time.perf_counter()
    alone = [stream_chat(client, q) for q in questions[:4]]
    t_sequential = time.perf_counter() - t0
    assert all(alone)

    with HealthWatcher(server) as watch, ThreadPoolExecutor(16) as pool:
        t0 = time.perf_counter()
        together = list(pool.map(lambda q: stream_chat(client, q), questions[:16]))
        t_concurrent = time.perf_counter() - t0
    assert together[:4] == alone
    assert all(together)
    assert watch.max_busy >= 8, f"at most {watch.max_busy} requests ran together"
    ratio = t_concurrent / t_sequential
    print(f"\n4 sequential: {t_sequential:.2f}s, 16 concurrent: {t_concurrent:.2f}s, ratio {ratio:.2f}")
    assert ratio < THROUGHPUT_LIMIT


def test_requests_beyond_the_slots_wait_and_are_served(server, client, questions) -> None:
    server.wait_idle()
    n_slots = server.health()["slots_total"]
    prompts = [questions[i % len(questions)] for i in range(n_slots + 6)]
    with HealthWatcher(server) as watch, ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda q: client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": q}], max_tokens=4, temperature=0), prompts))
    # requests beyond the slots waited; the slots filled (a 50 ms poll may miss the instant
    # all of them are busy: 4-token answers end while the last prompts are still admitted)
    # and never more ran than there are slots
    assert watch.max_waiting > 0 and n_slots // 2 < watch.max_busy <= n_slots, (watch.max_waiting, watch.max_busy)
    assert all(a.usage.completion_tokens >= 1 and a.choices[0].finish_reason for a in answers)
    for q, a in zip(prompts, answers):  # same question, same greedy answer, queued or not
        assert a.choices[0].message.content == answers[prompts.index(q)].choices[0].message.content


def _busy_after_close(server) -> tuple[dict, float]:
    t0 = time.perf_counter()
    h = server.wait_idle(timeout=5)
    return h, time.perf_counter() - t0


def test_streaming_disconnect_frees_the_slot(server, client) -> None:
    server.wait_idle()
    body = {"messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.api + "/chat/completions", json=body) as r:
        lines = r.iter_lines()  # held: dropping the iterator would close the response
        chunks = 0
        while chunks < 3:
            line = next(lines)
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                chunks += 1
        assert server.health()["slots_processing"] == 1
        r.close()
    h, seconds = _busy_after_close(server)
    assert h["slots_processing"] == 0, h
    assert seconds < 2.0
    assert stream_chat(client, "Say hi.", max_tokens=4)


def test_non_streaming_disconnect_frees_the_slot(server, client) -> None:
    server.wait_idle()
    body = json.dumps({"messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
                       "max_tokens": 400, "temperature": 0}).encode()
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (url.hostname.encode(), len(body), body))
        deadline = time.monotonic() + 30
        while server.health()["slots_processing"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.health()["slots_processing"] == 1
    h, seconds = _busy_after_close(server)
    assert h["slots_processing"] == 0, h
    assert seconds < 2.0
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
    assert r.choices[0].message.content


def test_batch_invariant_server_all_streams_equal_alone(smollm2_path, tmp_path, start_server, questions) -> None:
    """`serve --batch-invariant`: every one of 8 concurrent streams (greedy and seeded
    sampling, prompts prefilled together) equals the same request alone, token ids and
    their log-probabilities to the bit; a prompt larger than the --kv-size pool is a 400."""
    openai = __import__("pytest").importorskip("openai")
    from gguflm.quant import cpu

    if not cpu.simd_available():
        __import__("pytest").skip("batch invariance is the AVX-512 path's")
    with start_server(smollm2_path, tmp_path / "serve.log", "--batch-invariant", "--kv-size", "768",
                      parallel=8, n_ctx=1024) as srv:
        client = openai.OpenAI(base_url=srv.api, api_key="x", max_retries=0, timeout=300)

        def ask(i: int):
            extra = {"seed": 7 + i, "temperature": 0.9} if i % 2 else {"temperature": 0}
            r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": questions[i]}],
                                               max_tokens=12, logprobs=True, extra_body={"ignore_eos": True}, **extra)
            return [(t.token, t.logprob) for t in r.choices[0].logprobs.content]

        alone = [ask(i) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, range(8)))
        identical = sum(a == t for a, t in zip(alone, together))
        assert identical == 8, f"{identical} of 8 streams identical"
        r = httpx.post(srv.api + "/completions", json={"prompt": list(range(100, 900)), "max_tokens": 1}, timeout=60)
        assert r.status_code == 400 and "KV cache" in r.json()["error"]["message"]
