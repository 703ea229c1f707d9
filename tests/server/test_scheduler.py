"""The continuous-batching scheduler in process, on SmolLM2: what a request produces
does not depend on batching (greedy tokens equal the engine's single-sequence
one-slot generation of ``LLM.stream``, chunked prefill or not, queued or not), finish reasons and counts follow
the context and max_tokens, cancelled and waiting requests are handled, logprobs are
those of the logits at each generated position."""

from __future__ import annotations

import threading

import pytest
import torch

from gguflm.engine.sampling import SamplingParams
from gguflm.engine.scheduler import Done, Failed, Job, Piece, Scheduler, run_jobs

N_CTX = 128
GREEDY = SamplingParams(temperature=0)
TEXTS = ["Once upon a time, in a small village by the sea,", "The history of the printing press begins",
         "def fibonacci(n):\n    ", "Photosynthesis is the process by which", "My favourite recipe for soup is"]


@pytest.fixture(scope="module")
def model(smollm2_path):
    import gguflm

    return gguflm.load(smollm2_path, n_ctx=N_CTX)


@pytest.fixture(scope="module")
def prompts(model) -> list[tuple[int, ...]]:
    return [tuple(model.encode_prompt(t)) for t in TEXTS]


def tokens_alone(model, prompt, max_tokens: int) -> tuple[list[int], str]:
    """``generate``'s one-slot loop (whole prompt in one forward): tokens and finish reason."""
    stream = model.stream(prompt, max_tokens, GREEDY)
    list(stream)
    return stream.result.tokens, stream.result.finish_reason


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, Piece))


def done_of(events) -> Done:
    assert isinstance(events[-1], Done), events[-1]
    assert sum(not isinstance(e, Piece) for e in events) == 1
    return events[-1]


def test_batched_queued_chunked_equals_alone(model, prompts) -> None:
    sched = Scheduler(model, n_slots=2, prefill_chunk=5, prefill_budget=12)  # 5 jobs for 2 slots
    try:
        events = run_jobs(sched, [Job(p, GREEDY, 8) for p in prompts])
    finally:
        sched.close()
    for p, evs in zip(prompts, events):
        toks, finish = tokens_alone(model, p, 8)
        done = done_of(evs)
        assert (done.finish_reason, done.n_prompt, done.n_completion) == (finish, len(p), len(toks))
        assert text_of(evs) == model.tokenizer.decode(toks)


def test_context_full_and_max_tokens(model, prompts) -> None:
    sched = Scheduler(model, n_slots=3, n_ctx=len(prompts[0]) + 4, max_batch_rows=2)
    try:
        full, short, zero = run_jobs(sched, [Job(prompts[0], GREEDY), Job(prompts[0], GREEDY, 2),
                                             Job(prompts[0], GREEDY, 0)])
    finally:
        sched.close()
    toks = tokens_alone(model, prompts[0], 5)[0]
    assert len(toks) == 5  # no end of generation this early
    assert (done_of(full).finish_reason, done_of(full).n_completion) == ("length", 5)
    assert text_of(full) == model.tokenizer.decode(toks)
    assert (done_of(short).finish_reason, done_of(short).n_completion) == ("length", 2)
    assert (done_of(zero).finish_reason, done_of(zero).n_completion, text_of(zero)) == ("length", 0, "")


def test_cancel_running_and_waiting(model, prompts) -> None:
    sched = Scheduler(model, n_slots=1)
    got: dict[str, list] = {"a": [], "b": []}
    first_piece = threading.Event()

    def emit_a(ev) -> None:
        got["a"].append(ev)
        first_piece.set()

    try:
        a = sched.submit(Job(prompts[0], GREEDY, 100), emit_a)
        b = sched.submit(Job(prompts[1], GREEDY, 100), got["b"].append)
        assert first_piece.wait(60)
        assert sched.stats()["requests_waiting"] == 1
        b.cancel()
        a.cancel()
        (c_events,) = run_jobs(sched, [Job(prompts[2], GREEDY, 3)])  # the slot comes back
        assert done_of(c_events).n_completion == 3
        assert got["b"] == [] and not any(isinstance(e, (Done, Failed)) for e in got["a"])
        assert sched.stats() == {"slots_total": 1, "slots_processing": 0, "slots_idle": 1, "requests_waiting": 0}
    finally:
        sched.close()


def test_close_fails_what_is_left(model, prompts) -> None:
    sched = Scheduler(model, n_slots=1)
    got: list = []
    started = threading.Event()
    sched.submit(Job(prompts[0], GREEDY, 100), lambda ev: (got.append(ev), started.set()))
    assert started.wait(60)
    sched.close()
    assert isinstance(got[-1], Failed) and not any(isinstance(e, Done) for e in got)


def test_logprobs_are_those_of_each_position(model, prompts) -> None:
    sched = Scheduler(model, n_slots=2)
    try:
        (events,) = run_jobs(sched, [Job(prompts[3], GREEDY, 6, top_logprobs=3)])
    finally:
        sched.close()
    entries = [e for ev in events if isinstance(ev, Piece) for e in ev.logprobs]
    assert len(entries) == done_of(events).n_completion == 6
    ids = list(prompts[3]) + [e.id for e in entries]
    ref = torch.log_softmax(model.logits(ids)[len(prompts[3]) - 1:-1].double(), dim=-1)  # [6, V]
    for i, e in enumerate(entries):
        assert e.id == int(ref[i].argmax())
        assert e.logprob == pytest.approx(float(ref[i, e.id]), abs=1e-3)
        top = torch.topk(ref[i], 3)
        assert [t for t, _ in e.top] == top.indices.tolist()
        assert [lp for _, lp in e.top] == pytest.approx(top.values.tolist(), abs=1e-3)


def test_rejects_what_cannot_run(model) -> None:
    from gguflm.engine.generate import ContextLengthError, GenerationError

    sched = Scheduler(model, n_slots=1, n_ctx=16)
    try:
        with pytest.raises(ContextLengthError):
            sched.submit(Job(tuple(range(1, 17))), lambda ev: None)
        for bad in (Job(()), Job((model.config.n_vocab,)), Job((1,), max_tokens=-1)):
            with pytest.raises(GenerationError):
                sched.submit(bad, lambda ev: None)
    finally:
        sched.close()


def test_prompt_prefix_is_reused(model) -> None:
    head = TEXTS[0]
    p1, p2 = (tuple(model.encode_prompt(head + tail)) for tail in (" an old fisherman mended", " a young girl sang"))
    common = next(i for i, (a, b) in enumerate(zip(p1, p2)) if a != b)
    assert common > 5
    bs = 4
    sched = Scheduler(model, n_slots=2, block_size=bs)
    started = threading.Event()
    try:
        sched.submit(Job(p1, GREEDY, 40), lambda ev: started.set())   # holds slot 0 while B runs
        assert started.wait(60)
        (b_events,) = run_jobs(sched, [Job(p2, GREEDY, 8)])           # slot 1, shares slot 0's whole blocks
        (c_events,) = run_jobs(sched, [Job(p1, GREEDY, 8)])           # the whole prompt is cached
    finally:
        sched.close()
    assert done_of(b_events).n_cached == common // bs * bs
    assert done_of(c_events).n_cached == (len(p1) - 1) // bs * bs    # the last token is always computed
    for prompt, events in ((p2, b_events), (p1, c_events)):
        toks, finish = tokens_alone(model, prompt, 8)
        assert text_of(events) == model.tokenizer.decode(toks)
        assert (done_of(events).finish_reason, done_of(events).n_completion) == (finish, len(toks))


def test_ignore_eos_runs_to_max_tokens(model) -> None:
    """A chat answer that greedily ends after one token ("No", then the end-of-turn token)
    runs on to max_tokens with ignore_eos: the first token is the same and no
    end-of-generation token appears; without it the request stops as the engine does."""
    text = model.chat_template.render([{"role": "user", "content": "Reply with one word: yes or no. Is the sky blue?"}],
                                      add_generation_prompt=True)
    prompt = tuple(model.encode_prompt(text))
    toks, finish = tokens_alone(model, prompt, 12)
    assert finish == "stop" and len(toks) < 4
    sched = Scheduler(model, n_slots=2)
    try:
        plain, ignoring, sampled = run_jobs(sched, [
            Job(prompt, GREEDY, 12), Job(prompt, GREEDY, 12, ignore_eos=True),
            Job(prompt, SamplingParams(temperature=1.5, seed=3), 40, ignore_eos=True)])
    finally:
        sched.close()
    assert (done_of(sampled).finish_reason, done_of(sampled).n_completion) == ("length", 40)
    assert (done_of(plain).finish_reason, done_of(plain).n_completion) == ("stop", len(toks))
    assert (done_of(ignoring).finish_reason, done_of(ignoring).n_completion) == ("length", 12)
    assert text_of(ignoring).startswith(model.tokenizer.decode(toks))
    eog_pieces = {model.tokenizer.token_to_piece(t) for t in model.tokenizer.eog_ids}
    assert not any(p and p in text_of(ignoring) for p in eog_pieces)


def test_loop_on_the_callers_thread(model, prompts) -> None:
    """start=False: the loop runs where run() is called (the server's main thread) and
    returns on close(); results equal the threaded scheduler's."""
    sched = Scheduler(model, n_slots=2, start=False)
    runner = threading.Thread(target=sched.run)
    runner.start()
    try:
        events = run_jobs(sched, [Job(p, GREEDY, 4) for p in prompts[:2]])
    finally:
        sched.close()
        runner.join(10)
    assert not runner.is_alive()
    for p, evs in zip(prompts[:2], events):
        toks, _ = tokens_alone(model, p, 4)
        assert text_of(evs) == model.tokenizer.decode(toks)
    threaded = Scheduler(model, n_slots=1)
    try:
        with pytest.raises(RuntimeError):
            threaded.run()
    finally:
        threaded.close()
