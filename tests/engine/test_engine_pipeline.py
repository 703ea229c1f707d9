"""The scheduler's mixed steps over many slots running ahead (``pipeline``): each step is
launched on the ids the step before chose, still on the device, and that step's ids are
read (accepted, detokenized, stopped, emitted) while the next one runs.

The oracle is the same scheduler reading every step before launching the next
(``pipeline=False``, itself checked against each request alone, generate() and llama.cpp
by tests/server and tests/engine/test_engine_loop.py): with the C++ kernels'
batch-invariant mode a request's tokens do not depend on its company or on when it was
admitted, so every request must end the same to the token and to the character, with
the same log-probabilities, whatever the mix: greedy and seeded sampling, stop strings
seen mid-stream, end of generation, max_tokens, requests that ask for log-probabilities
or use penalties (the steps are then read at once: drained), a cancellation, a pool
small enough to preempt. Each run also checks that it did run ahead (else it would prove
nothing), that the metrics count the same, and that the pool is whole at the end."""

from __future__ import annotations

import threading

import pytest

from gguflm.engine.sampling import SamplingParams
from gguflm.engine.scheduler import Done, Job, Piece, Scheduler, run_jobs

N_CTX = 256  # the invariant_model fixture's context (tests/conftest.py INVARIANT_N_CTX)
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model(invariant_model):
    """SmolLM2 in the CPU's batch-invariant mode (tests/conftest.py), n_ctx N_CTX."""
    return invariant_model


def seeded(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.95, seed=7 + i)


def ids(model, text: str) -> tuple[int, ...]:
    return tuple(model.encode_prompt(text))


def outcome(events) -> tuple:
    """What a client sees of a request: its text, token ids, log-probabilities, end."""
    done = events[-1]
    assert isinstance(done, Done), done
    lps = [(lp.id, lp.logprob, lp.top) for e in events if isinstance(e, Piece) for lp in e.logprobs]
    return "".join(e.text for e in events if isinstance(e, Piece)), done.tokens, lps, done.finish_reason


class Counted(Scheduler):
    """A scheduler that counts its steps run ahead and the steps it read at once."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.n_ahead = self.n_drained = 0

    def _ahead(self) -> bool:
        ahead = super()._ahead()
        self.n_ahead += ahead
        self.n_drained += not ahead and self._pipeline
        return ahead


def served(model, jobs: list[Job], pipeline: bool, replay: bool = False, **kw) -> tuple[list[tuple], dict, Counted]:
    """``jobs`` submitted together to a scheduler of 4 slots (blocks of 16, prompts in
    chunks of 8 under 24 tokens a step) -> (each job's outcome, metrics, the scheduler).
    ``replay``: a preempted request feeds its generated tokens again as decode rows, one
    per step (what a model with row kinds does; ``_Seq.replay``)."""
    threads = threading.active_count()
    kw = {"n_slots": 4, "block_size": 16, "prefill_chunk": 8, "prefill_budget": 24, **kw}
    sched = Counted(model, pipeline=pipeline, **kw)
    sched._kind_replay = replay
    try:
        assert sched._mixed and sched.cache.paged
        events = run_jobs(sched, jobs)
        snap = sched.metrics.snapshot()
        kv = sched.kv_stats()
        assert kv["running"] == 0 and kv["blocks_used"] == 0 and sched.stats()["requests_waiting"] == 0
    finally:
        sched.close()
    assert threading.active_count() == threads      # the loop's thread is gone
    return [outcome(ev) for ev in events], snap, sched


def counts(snap: dict) -> dict:
    return {k: snap[k] for k in ("prompt_tokens", "generation_tokens", "finished")}


def test_running_ahead_gives_every_request_the_same_tokens(scheduler_prompts, model):
    """9 requests on 4 slots of 192 positions: greedy and seeded, stop strings met
    mid-stream, end of generation, max_tokens of 1 to 40, a full context, prompts sharing
    their head (prefix caching); also with the decode rows over several forwards a step
    (max_batch_rows)."""
    prompts = scheduler_prompts
    chat = ids(model, model.chat_prompt([{"role": "user", "content": "Name three colours."}]))
    jobs = [Job(ids(model, prompts[0]), GREEDY, 40, stop=("printing",)),
            Job(ids(model, prompts[1]), seeded(1), 30, ignore_eos=True),
            Job(chat, GREEDY, None),                                   # ends at end of generation
            Job(ids(model, prompts[3]), seeded(3), 1),
            Job(ids(model, prompts[4]), GREEDY, 30, stop=("if",)),
            Job(chat, seeded(5), 25, stop=("\n",)),
            Job(ids(model, prompts[5]), GREEDY, 5),
            Job(ids(model, prompts[2]), seeded(7), 40, stop=("energy",)),
            Job(ids(model, prompts[5]), GREEDY, None, ignore_eos=True)]      # to a full context
    base, snap, _ = served(model, jobs, False, n_ctx=192)
    assert [r[3] for r in base[:5]] == ["stop", "length", "stop", "length", "stop"]
    assert len(jobs[-1].prompt) + len(base[-1][1]) == 192 + 1 and base[-1][3] == "length"
    assert snap["prefix_hits"] > 0
    assert 0 < len(base[0][1]) < 40 and 0 < len(base[4][1]) < 30     # the stop strings end mid-stream
    for kw in ({}, {"max_batch_rows": 3}):
        ahead, snap1, sched = served(model, jobs, True, n_ctx=192, **kw)
        assert sched.n_ahead > 20 and sched.n_drained == 0
        assert ahead == base, kw
        assert counts(snap1) == counts(snap)


def test_requests_that_need_the_host_view_drain(scheduler_prompts, model):
    """Requests asking for log-probabilities or using penalties beside others that run
    ahead: while they run, every step is read at once; before and after, the steps run
    ahead. Same tokens, text and log-probabilities."""
    prompts = scheduler_prompts
    jobs = [Job(ids(model, prompts[0]), GREEDY, 40, ignore_eos=True),
            Job(ids(model, prompts[1]), seeded(1), 40, ignore_eos=True),
            Job(ids(model, prompts[2]), GREEDY, 6, top_logprobs=2, ignore_eos=True),
            Job(ids(model, prompts[3]), SamplingParams(temperature=0.8, repeat_penalty=1.3, seed=3), 8),
            Job(ids(model, prompts[4]), seeded(4), 40, stop=("return",))]
    base, snap, _ = served(model, jobs, False)
    ahead, snap1, sched = served(model, jobs, True)
    assert sched.n_ahead > 10 and sched.n_drained > 3
    assert ahead == base and len(base[2][2]) == 6 and all(len(lp[2]) == 2 for lp in base[2][2])
    assert counts(snap1) == counts(snap)


@pytest.mark.parametrize("replay", [False, True], ids=["prefilled-again", "replayed"])
def test_running_ahead_through_preemption(scheduler_prompts, model, replay):
    """6 requests of ~10 prompt + 40 generated tokens on 6 slots and a pool of 8 blocks of
    16 (2-3 requests at a time): when the pool runs out, the step in flight is read first
    and the youngest request preempted; it comes back (its generated tokens prefilled, or
    replayed as decode rows) and ends as without running ahead."""
    prompts = scheduler_prompts
    jobs = [Job(ids(model, p), GREEDY if i % 2 == 0 else seeded(i), 40, ignore_eos=True)
            for i, p in enumerate(prompts)]
    base, snap, _ = served(model, jobs, False, replay, n_slots=6, kv_blocks=8)
    ahead, snap1, sched = served(model, jobs, True, replay, n_slots=6, kv_blocks=8)
    assert snap["preemptions"] > 0 and snap1["preemptions"] > 0, "the pool never ran out: the test proves nothing"
    assert sched.n_ahead > 10 and sched.n_drained > 0
    assert ahead == base
    assert counts(snap1) == counts(snap)


def test_a_request_cancelled_while_running_ahead(scheduler_prompts, model):
    """One request cancelled after its third piece (the loop stepped by hand): it gets no
    further event, its id in flight is dropped unread; the others end as without running
    ahead, and the pool is whole again."""
    prompts = scheduler_prompts
    jobs = [Job(ids(model, p), GREEDY if i % 2 == 0 else seeded(i), 20, ignore_eos=True)
            for i, p in enumerate(prompts[:4])]

    def run(pipeline: bool) -> tuple[list, int]:
        sched = Counted(model, 4, block_size=16, prefill_chunk=8, prefill_budget=24, start=False, pipeline=pipeline)
        events: list[list] = [[] for _ in jobs]
        tickets = [sched.submit(job, events[i].append) for i, job in enumerate(jobs)]
        victim, n_seen = 1, 0
        for _ in range(200):
            if len(events[victim]) >= 3 and not tickets[victim].cancelled:
                tickets[victim].cancel()
                n_seen = len(events[victim])
            if all(evs and isinstance(evs[-1], Done) for i, evs in enumerate(events) if i != victim):
                break
            sched.step()
        sched.step()   # reap
        assert len(events[victim]) == n_seen and not any(isinstance(e, Done) for e in events[victim])
        kv = sched.kv_stats()
        assert kv["running"] == 0 and kv["blocks_used"] == 0
        sched.close()
        return [outcome(ev) for i, ev in enumerate(events) if i != victim], sched.n_ahead

    base, _ = run(False)
    ahead, n_ahead = run(True)
    assert n_ahead > 10 and ahead == base


def test_pipeline_over_several_slots_needs_mixed_steps(model):
    """Running ahead feeds rows of a mixed step: without them only one slot runs ahead."""
    with pytest.raises(ValueError, match="mixed steps"):
        Scheduler(model, 2, block_size=None, start=False, pipeline=True)
    assert not Scheduler(model, 2, start=False)._pipeline          # the default on the CPU: off
