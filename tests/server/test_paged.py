"""The paged KV cache and prefix caching, and bit-identical streams.

The block pool's bookkeeping (blocks taken on demand, shared by reference count, the
least recently released published block evicted first) is checked on its own. On
SmolLM2 with the C++ kernels in batch-invariant mode: a request that finds its system
prompt in the prefix cache produces the same tokens and the same logits, to the bit, as
the same request computed from scratch (and the hit is counted); every one of 8
concurrent streams (greedy and seeded sampling) equals the same request run alone, token
ids and logits to the bit. The oracle is the request alone: the property under test is
independence from the company, not agreement with another engine (llama.cpp's agreement
with these kernels is tests/model's)."""

from __future__ import annotations

import pytest
import torch

from gguflm.engine.sampling import SamplingParams
from gguflm.engine.scheduler import Done, Job, Scheduler, run_jobs
from gguflm.model.kv_cache import KVCache

N_CTX = 256  # the invariant_model fixture's context (conftest.INVARIANT_N_CTX)

GREEDY = SamplingParams(temperature=0)
SYSTEM = ("You are a careful assistant. Answer in one short paragraph, cite no sources, and never "
          "use lists. If a question is unclear, say so and ask for details before answering. ")
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Who wrote Hamlet?", "Explain gravity in one sentence.", "What is 2+2?", "Name a color.",
             "Tell me a joke."]


def test_block_pool_bookkeeping() -> None:
    c = KVCache(2, 3, 1, 40, 4, block_size=8, n_blocks=6)
    assert c.table.shape == (3, 5) and c.n_ctx == 40
    assert c.reserve(0, 17) and c.stats()["blocks_used"] == 3         # ceil(17 / 8)
    assert c.reserve(0, 17) and c.stats()["blocks_used"] == 3         # already held
    tokens = list(range(100, 117))
    c.publish(0, tokens)                                              # two whole blocks findable
    assert c.lookup(tokens + [1, 2]) == [int(b) for b in c.table[0, :2]]
    assert c.lookup([100] + tokens[1:]) != [] and c.lookup([99] + tokens[1:]) == []
    c.share(1, c.lookup(tokens))                                      # slot 1 starts on them
    assert c.stats()["blocks_used"] == 3 and torch.equal(c.table[1, :2], c.table[0, :2])
    assert c.reserve(1, 24) and c.stats()["blocks_used"] == 4
    assert not c.reserve(2, 24)                                       # 3 more: only 2 left
    assert c.stats()["blocks_used"] == 4                              # nothing taken
    c.release(0)
    c.release(1)
    s = c.stats()
    assert (s["blocks_used"], s["blocks_cached"], s["blocks_free"]) == (0, 2, 4)
    assert len(c.lookup(tokens)) == 2                                 # cached until the pool needs them
    assert c.reserve(2, 40)                                           # 5 blocks: one cached block evicted
    assert c.stats()["blocks_cached"] == 1
    assert c.lookup(tokens) == []                                     # the first block went (released first)
    with pytest.raises(ValueError):
        KVCache(1, 1, 1, 16, 4, block_size=0)


@pytest.fixture(scope="module")
def model(invariant_model):
    return invariant_model


def chat(model, question: str) -> tuple[int, ...]:
    text = model.chat_template.render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                                      add_generation_prompt=True)
    return tuple(model.encode_prompt(text))


def done(events) -> Done:
    assert isinstance(events[-1], Done), events[-1]
    return events[-1]


def run_alone(model, job: Job, **kw) -> Done:
    sched = Scheduler(model, n_slots=8, **kw)
    try:
        (events,) = run_jobs(sched, [job])
    finally:
        sched.close()
    return done(events)


def same(a: Done, b: Done) -> bool:
    return a.tokens == b.tokens and len(a.logits) == len(b.logits) and all(
        torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def test_prefix_hit_is_bit_identical_and_counted(model) -> None:
    first, second = chat(model, QUESTIONS[0]), chat(model, QUESTIONS[1])
    job = Job(second, GREEDY, 12, keep_logits=True)
    cold = run_alone(model, job)
    assert cold.n_cached == 0
    sched = Scheduler(model, n_slots=2, block_size=16)
    try:
        run_jobs(sched, [Job(first, GREEDY, 4)])     # publishes the system prompt's blocks
        (events,) = run_jobs(sched, [job])
        snap = sched.metrics.snapshot()
    finally:
        sched.close()
    warm = done(events)
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert warm.n_cached == common // 16 * 16 > 0
    assert same(warm, cold), "a prefix-cache hit changed the logits"
    assert (snap["prefix_queries"], snap["prefix_hits"], snap["cached_tokens"]) == (2, 1, warm.n_cached)


def test_eight_streams_equal_alone(model) -> None:
    """All 8 streams, greedy and seeded sampling, prompts of different lengths prefilled
    together and decoded together: token ids and every step's logits as alone."""
    jobs = [Job(chat(model, q), GREEDY if i % 2 == 0 else SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i),
                16, ignore_eos=True, keep_logits=True) for i, q in enumerate(QUESTIONS)]
    sched = Scheduler(model, n_slots=8, block_size=16)
    try:
        together = [done(evs) for evs in run_jobs(sched, jobs)]
    finally:
        sched.close()
    alone = [run_alone(model, job, block_size=16) for job in jobs]
    identical = [same(a, t) for a, t in zip(alone, together)]
    assert all(identical), f"{sum(identical)} of {len(jobs)} streams identical"
    assert all(d.n_completion == 16 for d in together)


@pytest.mark.parametrize("which,kernels", [("smollm2_path", "1"), ("gemma3_path", "1"), ("smollm2_path", "0")])
def test_paged_equals_contiguous(which, kernels, request, monkeypatch) -> None:
    """The same steps through a paged cache (blocks of 16, taken out of order) and through
    one contiguous block per slot: the same logits to the bit, the C++ block step's and the
    torch block's (Gemma 3's sliding window of 512 crossed: positions up to 700)."""
    import gguflm

    monkeypatch.setenv("GGUFLM_CPU_KERNELS", kernels)     # "0": the torch block (KVCache.update's gather)
    llm = gguflm.load(request.getfixturevalue(which), n_ctx=768)
    model = llm.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (700,), generator=g).tolist()
    chunks = [300, 250, 1, 1, 148]                     # a prefill, then single rows
    paged = model.new_cache(2, 768, block_size=16)
    paged.reserve(0, 48)                               # slot 0 takes blocks first: slot 1's are not in order
    flat = model.new_cache(2, 768)
    outs = []
    for cache in (paged, flat):
        got, p = [], 0
        for c in chunks:
            assert cache.reserve(1, p + c)
            if cache.paged and p == 300:
                cache.reserve(0, 200)                  # interleave the two slots' blocks
            got.append(model.forward(torch.tensor([ids[p:p + c]]), torch.arange(p, p + c)[None], cache,
                                     torch.tensor([1]), last_only=True))
            p += c
        outs.append(torch.cat(got))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(paged.table[0, :3], torch.tensor([0, 1, 2]))
