"""The real `openai` client against `gguflm serve` (SmolLM2): models, chat and text
completions, streamed and not, stop strings, seeds, usage, logprobs.

Oracles: llama.cpp (through llama-cpp-python) tokenizes the chat template as rendered by
llama-cpp-python's own Jinja formatter, and scores the prompt: the server's prompt token
count must match, and its logprobs must be llama.cpp's log-softmax up to the known
quantized-arithmetic gap. The rest are relations that hold for any correct server:
streamed text equals the plain text, a stop string cuts the unconstrained answer exactly
before its first occurrence, equal seeds give equal samples.
"""

from __future__ import annotations

import numpy as np
import pytest

from gguflm.model.kv_cache import DEFAULT_BLOCK_SIZE

MSG = [{"role": "user", "content": "What is the capital of France?"}]
LOGPROB_TOL = 0.5  # llama.cpp's 8-bit activations move logprobs by ~0.1 on this Q4_1 model


def stream_text(stream) -> tuple[str, str | None, object]:
    """Concatenated deltas, the finish reason and the usage of a streamed chat completion."""
    text, finish, usage, first = "", None, None, True
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if first:
                assert c.delta.role == "assistant"
                first = False
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish, usage


def test_models(client, smollm2_path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [smollm2_path.name]


def test_chat_streamed_equals_plain(client) -> None:
    plain = client.chat.completions.create(model="x", messages=MSG, max_tokens=24, temperature=0)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 24
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    text, finish, usage = stream_text(client.chat.completions.create(
        model="x", messages=MSG, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert text == choice.message.content
    assert finish == choice.finish_reason
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(usage, k) for k in counts] == [getattr(plain.usage, k) for k in counts]
    # the same prompt again: its whole KV blocks (all of it but at least the last token)
    # come from the prefix cache
    bs = DEFAULT_BLOCK_SIZE
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // bs * bs


def test_max_tokens_finishes_with_length(client) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Write a long story."}],
                                           temperature=0, **{field: 3})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_completions_streamed_equals_plain(client) -> None:
    prompt = "The three primary colors are"
    plain = client.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0)
    assert plain.choices[0].text and plain.usage.completion_tokens == 12
    assert plain.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="x", prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == plain.choices[0].text


def test_stop_string_cuts_before_its_first_occurrence(client) -> None:
    free = client.chat.completions.create(model="x", messages=MSG, max_tokens=24, temperature=0)
    full = free.choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    cut = client.chat.completions.create(model="x", messages=MSG, max_tokens=24, temperature=0, stop=[stop, "\u2603"])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed, finish, _ = stream_text(client.chat.completions.create(
        model="x", messages=MSG, max_tokens=24, temperature=0, stop=stop, stream=True))
    assert (streamed, finish) == (full[:full.index(stop)], "stop")


def test_same_seed_same_sample(client) -> None:
    msg = [{"role": "user", "content": "Invent a name for a pet dragon."}]

    def sample(seed: int) -> str:
        return client.chat.completions.create(model="x", messages=msg, max_tokens=16, temperature=1.2,
                                              top_p=1.0, seed=seed, extra_body={"top_k": 0, "min_p": 0.0}).choices[0].message.content

    a = sample(1234)
    assert sample(1234) == a
    assert len({a, sample(1), sample(2), sample(3)}) > 1, "four seeds, one sample: the seed is ignored"


@pytest.fixture(scope="module")
def llama(smollm2_path):
    """llama.cpp on the same file, and its view of the chat prompt."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the test oracle; install .[dev]")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from gguflm.verify.llamacpp_worker import open_llama

    llm = open_llama(smollm2_path, n_ctx=512, logits_all=True, verbose=False, n_threads=1)  # no AMX/repack
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"],
                              eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
                              bos_token=llm.detokenize([llm.token_bos()], special=True).decode())

    def chat_ids(messages: list[dict]) -> list[int]:
        text = fmt(messages=messages).prompt
        return llm.tokenize(text.encode(), add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)), special=True)

    def next_logprobs(ids: list[int]) -> list[float]:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
        shifted = logits - logits.max()
        return (shifted - np.log(np.exp(shifted).sum())).tolist()

    return llm, chat_ids, next_logprobs


def test_prompt_tokens_match_llama_cpp(client, llama, questions) -> None:
    _, chat_ids, _ = llama
    for q in questions[:6]:
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q}]
        r = client.chat.completions.create(model="x", messages=messages, max_tokens=1)
        assert r.usage.prompt_tokens == len(chat_ids(messages)), q


def test_logprobs_match_llama_cpp(client, llama, questions) -> None:
    llm, chat_ids, next_logprobs = llama
    for q in questions[:3]:
        ids = chat_ids([{"role": "user", "content": q}])
        ref = next_logprobs(ids)
        best = sorted(range(len(ref)), key=ref.__getitem__, reverse=True)[:3]
        r = client.completions.create(model="x", prompt=ids, max_tokens=1, temperature=0, logprobs=5)
        lp = r.choices[0].logprobs
        top = lp.top_logprobs[0]
        assert len(top) == 5 and lp.text_offset == [0]
        for t in best:
            piece = llm.detokenize([t]).decode("utf-8", errors="replace")
            assert piece in top, (q, piece, top)
            assert abs(top[piece] - ref[t]) < LOGPROB_TOL, (q, piece, top[piece], ref[t])
        if ref[best[0]] - ref[best[1]] > 2 * LOGPROB_TOL:  # a clear winner: greedy must pick it
            assert lp.tokens[0] == llm.detokenize([best[0]]).decode("utf-8", errors="replace")
        assert lp.token_logprobs[0] == pytest.approx(max(top.values()))
        # the chat endpoint scores the same prompt: same numbers in the chat shape. Its prompt
        # reuses the cached keys/values of the request above and computes its last position in a
        # separate step, whose float32 sums (GEMV vs sgemm tiles) round differently: ~1e-5.
        c = client.chat.completions.create(model="x", messages=[{"role": "user", "content": q}], max_tokens=1,
                                           temperature=0, logprobs=True, top_logprobs=5)
        entry = c.choices[0].logprobs.content[0]
        assert entry.token == lp.tokens[0] and entry.logprob == pytest.approx(lp.token_logprobs[0], abs=5e-5)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        assert {a.token: a.logprob for a in entry.top_logprobs} == pytest.approx(top, abs=5e-5)


def test_streamed_logprobs_cover_every_token(client) -> None:
    chunks = list(client.chat.completions.create(model="x", messages=MSG, max_tokens=10, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True,
                                                 stream_options={"include_usage": True}))
    entries = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    usage = chunks[-1].usage
    assert len(entries) == usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace") == text
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=42)], ids=["greedy", "seeded"])
def test_one_client_gets_what_generate_gives(client, smollm2_path, sampling) -> None:
    """The server (16 slots, one client) runs the same loop as the Python API: the same
    greedy and seeded tokens for the same chat (the CPU kernels are batch invariant)."""
    import gguflm

    msg = [{"role": "user", "content": "Name three colours."}]
    ours = "".join(gguflm.load(smollm2_path, n_ctx=512).chat(msg, max_tokens=16, **sampling))
    seed = {"seed": sampling["seed"]} if "seed" in sampling else {}
    served = client.chat.completions.create(model="x", messages=msg, max_tokens=16,
                                            temperature=sampling["temperature"], **seed).choices[0].message.content
    assert served == ours
