"""The one generation loop: what crosses to the host per step, and the same tokens from
every caller (``generate()``, ``gguflm run``, the server's scheduler with one client,
``verify``'s decode).

The host-read check follows the logits: the model's output is wrapped in a tensor
subclass that propagates through every operation of the sampling chain and records each
read back to the host (``tolist``, ``item``, ``int``, ``cpu``, ``numpy``...). Per step,
exactly one read of one id per sequence is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gguflm.engine.sampling import SamplingParams
from gguflm.engine.scheduler import Job, Piece, Scheduler, run_jobs

READS = {"tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__", "__array__",
         "__len__", "__iter__"}


class Tracked(torch.Tensor):
    """A tensor that records every read to the host of itself or of what is computed from it."""

    reads: list[tuple[str, int]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name == "to" and any(a in ("cpu", torch.device("cpu")) for a in args[1:])):
            Tracked.reads.append((name, args[0].numel()))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.fixture
def tracked(smollm2_model, monkeypatch):
    """smollm2_model whose forward returns Tracked logits; yields the list of reads."""
    model = smollm2_model.model
    forward = model.forward

    def wrapped(*a, **k):
        return forward(*a, **k).as_subclass(Tracked)

    monkeypatch.setattr(model, "forward", wrapped)
    Tracked.reads = []
    yield Tracked.reads


QUESTION = [{"role": "user", "content": "Name three colours."}]
CHAINS = [SamplingParams(temperature=0),
          SamplingParams(temperature=0.8, seed=5),
          SamplingParams(temperature=0.7, top_k=0, top_p=0.9, min_p=0.1, repeat_penalty=1.2, seed=1)]


@pytest.mark.parametrize("params", CHAINS, ids=["greedy", "default-chain", "penalties-whole-vocab"])
def test_one_id_per_step_crosses_to_the_host(smollm2_model, tracked, params):
    s = smollm2_model.stream(smollm2_model.chat_prompt(QUESTION), 8, params, ignore_eos=True)
    list(s)
    assert s.result.n_generated == 8
    assert tracked == [("tolist", 1)] * 8, tracked   # one id per step: the prefill's, then each decode's


def test_batched_step_reads_one_id_per_row(smollm2_model, tracked):
    m = smollm2_model
    sched = Scheduler(m, n_slots=3, start=False)
    jobs = [Job(tuple(m.encode_prompt(t)), p, 5, ignore_eos=True)
            for t, p in zip(["One, two,", "The sea is", "Red, green,"], CHAINS)]
    done = [0]
    tickets = [sched.submit(j, lambda ev: done.__setitem__(0, done[0] + (not isinstance(ev, Piece)))) for j in jobs]
    while done[0] < len(tickets):
        sched.step()
    # three prompts in one prefill forward (one read of 3 ids), then 4 decode steps of 3 rows
    assert tracked == [("tolist", 3)] * 5, tracked


def _tokens(events) -> list[int]:
    return list(events[-1].tokens)


@pytest.mark.parametrize("params", CHAINS[:2], ids=["greedy", "seeded"])
def test_same_tokens_from_every_caller(smollm2_model, smollm2_path, params):
    """generate() = the server's scheduler (4 slots, one client) = `gguflm run` = verify's loop."""
    from gguflm.verify.run import greedy_decode

    m = smollm2_model
    prompt = m.chat_prompt(QUESTION)
    s = m.stream(prompt, 16, params)
    text = "".join(s)
    tokens = s.result.tokens
    assert len(tokens) > 4

    sched = Scheduler(m, n_slots=4)
    try:
        served = run_jobs(sched, [Job(tuple(m.encode_prompt(prompt)), params, 16)])[0]
    finally:
        sched.close()
    assert _tokens(served) == tokens and "".join(e.text for e in served if isinstance(e, Piece)) == text

    seed = [] if params.seed is None else ["--seed", str(params.seed)]
    r = subprocess.run([sys.executable, "-m", "gguflm", "run", "-m", str(smollm2_path), "-p", QUESTION[0]["content"],
                        "-n", "16", "--temp", str(params.temperature), *seed], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == text.rstrip("\n")

    if params.greedy:
        new, rows = greedy_decode(m, m.encode_prompt(prompt), 16)
        assert new == tokens and rows.shape[0] in (len(new), len(new) + 1)


def _one_slot_runs(m, jobs: list[Job], pipeline: bool, n_ctx: int | None = None) -> list[tuple]:
    """Each job in turn through one one-slot scheduler: (text, tokens, finish_reason)."""
    from gguflm.engine.llm import TextStream

    sched = Scheduler(m, 1, n_ctx, prefill_chunk=4096, prefill_budget=4096, start=False, pipeline=pipeline)
    out = []
    for job in jobs:
        s = TextStream(sched, job)
        text = "".join(s)
        out.append((text, s.result.tokens, s.result.finish_reason))
    return out


def test_running_ahead_gives_the_same_tokens(smollm2_model):
    """A one-slot scheduler that runs ahead (the next step launched on the id the device
    chose, read one step late) ends every request as the step-by-step loop does: at an
    end-of-generation token, a stop string, max_tokens, a full context, with a seeded
    draw; one after another in the same slot (the discarded step's key/value unread)."""
    m = smollm2_model
    ids = tuple(m.encode_prompt(m.chat_prompt(QUESTION)))
    greedy, seeded = CHAINS[0], CHAINS[1]
    jobs = [Job(ids, greedy, None), Job(ids, greedy, 24, stop=("obvious",)), Job(ids, seeded, 20),
            Job(ids, greedy, 6, ignore_eos=True), Job(ids, greedy, 1), Job(ids[:-3], seeded, 12, stop=(".",))]
    ahead = _one_slot_runs(m, jobs, True)
    assert ahead == _one_slot_runs(m, jobs, False)
    assert [r[2] for r in ahead[:2]] == ["stop", "stop"] and len(ahead[0][1]) > 24
    full = [Job(ids, greedy, None, ignore_eos=True)]
    assert _one_slot_runs(m, full, True, len(ids) + 5) == _one_slot_runs(m, full, False, len(ids) + 5)


def test_running_ahead_reads_ids_only(smollm2_model, tracked):
    """Running ahead, only ids cross to the host (the logits never), and no step is
    launched past max_tokens."""
    m = smollm2_model
    job = Job(tuple(m.encode_prompt(m.chat_prompt(QUESTION))), CHAINS[1], 8, ignore_eos=True)
    assert len(_one_slot_runs(m, [job], True)[0][1]) == 8
    assert tracked and all(n == 1 for _, n in tracked), tracked
    assert [name for name, _ in tracked].count("to") == 7    # decode steps: 8 tokens, the first from the prefill
