"""The streaming host path's shortcuts give what the long way gives: a text chunk's
server-sent event from its template is the chunk object as JSON (oracle: Python's
``json``), pieces that waited together reach the real ``openai`` client as one chunk with
the same text and usage, and the scheduler counts a step's tokens in its metrics before
anyone hears of them."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gguflm.engine.formats import ChatFormat, CompletionFormat
from gguflm.engine.sampling import SamplingParams
from gguflm.engine.scheduler import Done, Job, Piece, Scheduler, run_jobs
from gguflm.model.kv_cache import KVCache
from gguflm.server.app import _stream
from gguflm.server.backend import Generation

TOKENIZER = SimpleNamespace(token_to_piece=lambda t, special=False: b"x")


def json_event(obj) -> bytes:
    """An event as the server wrote every chunk before templates: Python's json of the object."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


@settings(max_examples=200, deadline=None)
@given(text=st.text(), model_id=st.text(min_size=1).filter(lambda s: "\x00" not in s),
       chat=st.booleans(), include_usage=st.booleans())
def test_text_event_is_the_chunk_as_json(text, model_id, chat, include_usage) -> None:
    fmt = (ChatFormat if chat else CompletionFormat)(model_id, TOKENIZER, include_usage)
    assert fmt.text_event(text) == json_event(fmt.chunk(Piece(text), False))


def burst_stream(sched, fmt, events) -> bytes:
    """The bytes ``app._stream`` writes when ``events`` all wait before the loop looks."""
    async def main() -> bytes:
        gen = Generation(sched, job=None)
        worker = threading.Thread(target=lambda: [sched.emit(ev) for ev in events])
        worker.start()
        worker.join()
        return b"".join([b async for b in _stream(gen, fmt, False)])

    return asyncio.run(main())


def openai_client(body: bytes):
    openai = pytest.importorskip("openai")
    transport = httpx.MockTransport(lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=body))
    return openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="x", max_retries=0,
                         http_client=httpx.Client(transport=transport))


PIECES = [Piece("Hel"), Piece("lo, "), Piece("wörld 🙂"), Piece(' "q" \\')]
TEXT = "".join(p.text for p in PIECES)


@pytest.mark.parametrize("include_usage", [True, False])
def test_coalesced_chat_chunks_reach_openai_as_one(include_usage, fake_scheduler) -> None:
    fmt = ChatFormat("m", TOKENIZER, include_usage)
    body = burst_stream(fake_scheduler, fmt, [*PIECES, Done("length", 7, 9)])
    chunks = list(openai_client(body).chat.completions.create(model="m", messages=[], stream=True))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == [TEXT]                              # one chunk: the four pieces joined
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert [(u.prompt_tokens, u.completion_tokens, u.total_tokens) for u in usage] == [(7, 9, 16)]
    else:
        assert usage == []
    assert body.endswith(b"data: [DONE]\n\n")


def test_coalesced_text_chunks_reach_openai_as_one(fake_scheduler) -> None:
    fmt = CompletionFormat("m", TOKENIZER, True)
    body = burst_stream(fake_scheduler, fmt, [*PIECES, Done("stop", 3, 4)])
    chunks = list(openai_client(body).completions.create(model="m", prompt="p", stream=True))
    assert [c.choices[0].text for c in chunks if c.choices and c.choices[0].text] == [TEXT]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert [(c.usage.prompt_tokens, c.usage.completion_tokens) for c in chunks if c.usage] == [(3, 4)]


class _Model:
    """Just enough of a batch-invariant model for the scheduler: every row chooses token 1."""

    paged_cache = True
    batch_invariant = True
    row_kinds = False

    def __init__(self) -> None:
        self.config = SimpleNamespace(n_vocab=4)
        self.n_ctx = 256
        self.device = torch.device("cpu")

    def new_cache(self, n_slots, n_ctx=None, block_size=None, n_blocks=None) -> KVCache:
        return KVCache(1, n_slots, 1, n_ctx or self.n_ctx, 1, block_size=block_size, n_blocks=n_blocks)

    def flat_steps_over(self, cache) -> bool:
        return True

    def forward(self, tokens, positions, cache, slots, last_only=False, select=None, **kw):
        rows = len(select) if select is not None else tokens.shape[0]
        return torch.tensor([[0.0, 1.0, 0.0, 0.0]]).expand(rows, 4)


@pytest.mark.parametrize("after_launch", [False, True], ids=["at-step-end", "after-next-launch"])
@pytest.mark.parametrize("pipeline", [False, True], ids=["read-at-once", "running-ahead"])
def test_tokens_are_counted_before_anyone_hears_of_them(pipeline, after_launch) -> None:
    """Every event goes out after the metrics count the tokens it carries (the scheduler
    sends a step's events together, its tokens counted first), and every request's events
    all go out, also where they wait for the next step's launch (CUDA's order) and the
    last request ends."""
    tok = SimpleNamespace(eog_ids=frozenset(), token_to_piece=lambda t, special=False: b"a")
    sched = Scheduler(SimpleNamespace(model=_Model(), tokenizer=tok), 4, start=False, pipeline=pipeline)
    sched.events_after_launch = after_launch
    heard = [0]

    def emit(ev) -> None:
        if isinstance(ev, Piece):
            heard[0] += len(ev.text)
            assert sched.metrics.generation_tokens >= heard[0]

    thread = threading.Thread(target=sched.run)
    thread.start()
    try:
        jobs = [Job((1, 2, 3)[:1 + i % 3], SamplingParams(temperature=0.0), 5 + i) for i in range(6)]
        for job in jobs:
            sched.submit(job, emit)
        events = run_jobs(sched, jobs)
    finally:
        sched.close()
        thread.join(10)
    assert [ev[-1].n_completion for ev in events] == [5 + i for i in range(6)]
    assert sched.metrics.generation_tokens == 2 * sum(5 + i for i in range(6))
    assert heard[0] == sum(5 + i for i in range(6))
