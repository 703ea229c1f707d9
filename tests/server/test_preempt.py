"""Preemption when the KV cache's block pool runs out (vLLM's recompute mode).

Several long requests share a pool too small for all of them: the most recently admitted
running request gives its blocks back, waits first in line, and is prefilled again later
(its prompt and generated tokens). The oracle is each request run ALONE through the
engine's own ``generate()`` path (``LLM.stream``: one slot, the whole prompt in one step,
a pool that holds it): with the C++ kernels' batch-invariant mode, every request among
the others, preempted or not, must give the same token ids and the same logits to the
bit (greedy, and seeded sampling: the random generator survives the preemption). The
preemption counter is asked to be > 0 (else the test would prove nothing), and the pool
to be whole again at the end. A request too large for the pool even alone is refused
(KVPoolError; a 400 ``context_length_exceeded`` from the server); one without
``max_tokens`` that fills the pool alone ends with "length"."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from gguflm.engine.sampling import SamplingParams
from gguflm.engine.scheduler import Done, Job, KVPoolError, Scheduler, run_jobs

N_CTX = 256  # the invariant_model fixture's context (conftest.INVARIANT_N_CTX)

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model(invariant_model):
    return invariant_model


def alone(model, job: Job) -> Done:
    """The request through generate()'s own loop (one slot, nothing else running)."""
    text = model.stream(list(job.prompt), job.max_tokens, job.params, ignore_eos=job.ignore_eos,
                        keep_logits=job.keep_logits)
    for _ in text:
        pass
    return text.done


def done(events) -> Done:
    assert isinstance(events[-1], Done), events[-1]
    return events[-1]


def same(a: Done, b: Done) -> bool:
    return a.tokens == b.tokens and len(a.logits) == len(b.logits) and all(
        torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def jobs_for(model, prompts: list[str], n_gen: int) -> list[Job]:
    return [Job(tuple(model.encode_prompt(p)),
                GREEDY if i % 2 == 0 else SamplingParams(temperature=0.9, top_p=0.95, seed=7 + i),
                n_gen, ignore_eos=True, keep_logits=True) for i, p in enumerate(prompts)]


def check_pool_whole(sched: Scheduler) -> None:
    kv = sched.kv_stats()
    assert kv["running"] == 0 and kv["blocks_used"] == 0
    assert kv["blocks_free"] + kv["blocks_cached"] == kv["blocks_total"]
    assert sched.stats()["requests_waiting"] == 0 and sched.stats()["slots_idle"] == sched.n_slots


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed-step", "prefill-then-decode"])
def test_preempted_requests_equal_alone(scheduler_prompts, model, mixed) -> None:
    """6 requests of ~10 prompt + 40 generated tokens on 6 slots and a pool of 8 blocks of
    16 (128 positions: 2-3 requests at a time): every one finishes, ids and logits as alone."""
    jobs = jobs_for(model, scheduler_prompts, 40)
    sched = Scheduler(model, n_slots=len(jobs), block_size=16, kv_blocks=8, prefill_chunk=8, prefill_budget=24)
    sched._mixed = sched._mixed and mixed   # the path of models without flat steps (CUDA, the torch block)
    try:
        together = [done(evs) for evs in run_jobs(sched, jobs)]
        snap = sched.metrics.snapshot()
        check_pool_whole(sched)
    finally:
        sched.close()
    assert snap["preemptions"] > 0, "the pool never ran out: the test proves nothing"
    assert snap["finished"] == {"length": len(jobs)}
    solo = [alone(model, job) for job in jobs]
    identical = [same(a, t) for a, t in zip(solo, together)]
    assert all(identical), f"{sum(identical)} of {len(jobs)} streams identical after {snap['preemptions']} preemptions"
    assert all(d.n_completion == 40 for d in together)


def test_too_large_for_the_pool(scheduler_prompts, model) -> None:
    prompts = scheduler_prompts
    sched = Scheduler(model, n_slots=2, block_size=16, kv_blocks=4)   # 64 positions
    try:
        prompt = tuple(model.encode_prompt(prompts[0]))
        with pytest.raises(KVPoolError, match="--kv-size"):
            sched.submit(Job(prompt, GREEDY, 64 - len(prompt) + 2), lambda ev: None)
        # without max_tokens: the pool is its context; it ends with "length", nothing fails
        (events,) = run_jobs(sched, [Job(prompt, GREEDY, None, ignore_eos=True)])
        d = done(events)
        assert d.finish_reason == "length" and d.n_prompt + d.n_completion == 64 + 1
        check_pool_whole(sched)
    finally:
        sched.close()


def test_cancel_while_preempted(scheduler_prompts, model) -> None:
    """A request cancelled while it waits preempted leaves the queue with no further event;
    the others finish; the pool is whole again (the loop stepped by hand)."""
    prompts = scheduler_prompts
    jobs = [Job(tuple(model.encode_prompt(p)), GREEDY, 40, ignore_eos=True) for p in prompts[:3]]
    sched = Scheduler(model, n_slots=3, block_size=16, kv_blocks=4, start=False)   # 64 positions
    events: list[list] = [[] for _ in jobs]
    tickets = [sched.submit(job, events[i].append) for i, job in enumerate(jobs)]
    try:
        for _ in range(200):
            if sched._preempted:
                break
            sched.step()
        assert sched._preempted, "no request was preempted"
        victim = tickets.index(sched._preempted[0].ticket)
        n_before = len(events[victim])
        tickets[victim].cancel()
        for _ in range(400):
            if all(evs and isinstance(evs[-1], Done) for i, evs in enumerate(events) if i != victim):
                break
            sched.step()
        sched.step()   # reap
        assert len(events[victim]) == n_before and not any(isinstance(e, Done) for e in events[victim])
        for i, evs in enumerate(events):
            if i != victim:
                assert isinstance(evs[-1], Done) and evs[-1].n_completion == 40
        check_pool_whole(sched)
    finally:
        sched.close()


def test_server_preempts_and_counts(scheduler_prompts, model, smollm2_path, start_server, tmp_path) -> None:
    """The real server, 4 slots and --kv-size 96 (6 blocks): 4 concurrent completions of 40
    tokens each (greedy and seeded) equal, token texts and logprobs, the same requests sent
    alone afterwards; /metrics counts the preemptions; a request the pool cannot hold alone
    is a 400 context_length_exceeded."""
    httpx = pytest.importorskip("httpx")
    jobs = jobs_for(model, scheduler_prompts, 40)[:4]
    with start_server(smollm2_path, tmp_path / "serve.log", "--kv-size", "96", "--batch-invariant",
                      parallel=4, n_ctx=N_CTX) as srv:
        def complete(job: Job) -> tuple[list, list]:
            p = job.params
            body = {"model": "m", "prompt": list(job.prompt), "max_tokens": job.max_tokens,
                    "temperature": p.temperature, "top_p": p.top_p, "ignore_eos": True, "logprobs": 0}
            if p.seed is not None:
                body["seed"] = p.seed
            r = httpx.post(srv.api + "/completions", json=body, timeout=600)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length"
            return choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(complete, jobs))
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        solo = [complete(job) for job in jobs]
        big = httpx.post(srv.api + "/completions", json={"model": "m", "prompt": list(jobs[0].prompt),
                                                        "max_tokens": 200}, timeout=60)
        health = srv.wait_idle()
    preemptions = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("gguflm:num_preemptions_total{")]
    assert preemptions and preemptions[0] > 0, "the pool never ran out: the test proves nothing"
    assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded"
    assert "--kv-size" in big.json()["error"]["message"]
    assert health["slots_processing"] == 0 and health["requests_waiting"] == 0
    assert together == solo
