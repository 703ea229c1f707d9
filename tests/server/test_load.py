"""A bounded load test on loopback (127.0.0.1 only): a fixed number of clients send a
fixed number of mixed requests (chat and text, streamed and not); every answer must
arrive whole and be exactly the greedy answer its prompt gets alone, and the server's
resident memory must stay flat across the run."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

N_CLIENTS = 8
N_REQUESTS = 32         # in all, spread over the clients
MAX_TOKENS = 6
DEADLINE_S = 240        # the whole run must end by then
RSS_GROWTH_LIMIT = 48 * 2**20


def _ask(client, kind: str, prompt: str) -> tuple[str, str]:
    """(text, finish_reason) of one greedy request of the given kind."""
    common = {"model": "x", "max_tokens": MAX_TOKENS, "temperature": 0}
    msgs = [{"role": "user", "content": prompt}]
    if kind == "chat":
        c = client.chat.completions.create(messages=msgs, **common).choices[0]
        return c.message.content, c.finish_reason
    if kind == "chat-stream":
        text, finish = "", None
        for chunk in client.chat.completions.create(messages=msgs, stream=True, **common):
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return text, finish
    if kind == "text":
        c = client.completions.create(prompt=prompt, **common).choices[0]
        return c.text, c.finish_reason
    text, finish = "", None
    for chunk in client.completions.create(prompt=prompt, stream=True, **common):
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
    return text, finish


KINDS = ("chat", "chat-stream", "text", "text-stream")


def test_bounded_load(server, client, questions) -> None:
    prompts = questions[:4]
    # what each (kind, prompt) answers alone; streamed kinds equal their plain twins
    expected = {}
    for p in prompts:
        for kind in ("chat", "text"):
            expected[kind, p] = expected[kind + "-stream", p] = _ask(client, kind, p)

    work = list(itertools.islice(itertools.cycle(itertools.product(KINDS, prompts)), N_REQUESTS))

    def run_round() -> list[tuple[str, str]]:
        with ThreadPoolExecutor(N_CLIENTS) as pool:
            return list(pool.map(lambda w: _ask(client, *w), work, timeout=DEADLINE_S))

    t0 = time.monotonic()
    assert run_round() == [expected[w] for w in work]   # warm-up: allocator and caches reach steady state
    server.wait_idle()
    rss_before = server.rss_bytes()
    answers = run_round()
    server.wait_idle()
    rss_after = server.rss_bytes()
    assert time.monotonic() - t0 < DEADLINE_S
    lost_or_garbled = [(w, a, expected[w]) for w, a in zip(work, answers) if a != expected[w]]
    assert not lost_or_garbled
    growth = rss_after - rss_before
    print(f"\nRSS {rss_before / 2**20:.0f} MiB -> {rss_after / 2**20:.0f} MiB over {N_REQUESTS} requests")
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB"
