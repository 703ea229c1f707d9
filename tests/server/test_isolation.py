"""One bad step never poisons other streams (issue 16, item 2): a file whose embedding has
more rows than its vocabulary is refused at load, as llama.cpp refuses it; logits that
cannot be sampled fail their request with an error, not the sampler with torch's; and a
failure in one sequence (sampling, detokenizing) ends that sequence alone while a greedy
stream beside it produces exactly what it produces alone."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gguflm
from gguflm.engine.sampling import SamplingError, SamplingParams, sample
from gguflm.engine.scheduler import Done, Failed, Job, Piece, Scheduler, run_jobs

N_DROPPED = 64  # the file: an embedding of 49,216 rows for 49,152 tokens


def test_an_embedding_with_more_rows_than_tokens_is_refused_as_llama_cpp_does(smollm2_path: Path, tmp_path: Path,
                                                                             gguf_rewriter) -> None:
    gguf = pytest.importorskip("gguf")
    md = gguflm.GGUFFile(smollm2_path).metadata
    n = len(md["tokenizer.ggml.tokens"]) - N_DROPPED
    dropped = set(md["tokenizer.ggml.tokens"][n:])
    merges = [m for m in md["tokenizer.ggml.merges"] if m.replace(" ", "") not in dropped]
    A, S, I = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.INT32
    bad = gguf_rewriter(smollm2_path, tmp_path / "padded.gguf", {
        "tokenizer.ggml.tokens": (A, md["tokenizer.ggml.tokens"][:n], S),
        "tokenizer.ggml.token_type": (A, list(md["tokenizer.ggml.token_type"][:n]), I),
        "tokenizer.ggml.merges": (A, merges, S)})
    # the oracle: llama.cpp refuses to load it (token_embd has the wrong shape)
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the test oracle")
    oracle = subprocess.run([sys.executable, "-c", "import sys, llama_cpp; llama_cpp.Llama(sys.argv[1], verbose=False)",
                             str(bad)], capture_output=True, text=True, timeout=300)
    assert oracle.returncode != 0, "llama.cpp loaded it"
    with pytest.raises(gguflm.GGUFError, match=f"{n} tokens but the embedding {n + N_DROPPED} rows"):
        gguflm.load(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all -inf"])
def test_logits_that_cannot_be_sampled_raise_sampling_error(bad) -> None:
    logits = torch.randn(1000)
    if bad == "all -inf":
        logits[:] = -math.inf
    else:
        logits[17] = bad
    params = SamplingParams(temperature=0.8, seed=1)
    with pytest.raises(SamplingError, match="not finite"):
        sample(logits, params, generator=torch.Generator().manual_seed(1))
    with pytest.raises(SamplingError):  # penalties and filters change nothing
        sample(logits, SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.3),
               history=[1, 2, 17], generator=torch.Generator().manual_seed(1))
    ok = torch.randn(1000)
    ok[:10] = -math.inf  # some tokens masked (ignore_eos) is fine
    assert 10 <= sample(ok, params, generator=torch.Generator().manual_seed(1)) < 1000


def _text(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, Piece))


@pytest.fixture(scope="module")
def model(smollm2_path: Path):
    return gguflm.load(smollm2_path, n_ctx=256)


def test_a_failing_sequence_ends_alone_and_a_greedy_neighbour_is_unchanged(model, monkeypatch) -> None:
    import gguflm.engine.scheduler as sched

    prompt = tuple(model.encode_prompt("The capital of France is"))
    greedy = Job(prompt, SamplingParams(temperature=0), max_tokens=24)
    nan_later = Job(tuple(model.encode_prompt("Once upon a time")), SamplingParams(temperature=0.8, seed=7),
                    max_tokens=24)
    out_of_vocab = Job(tuple(model.encode_prompt("Hello")), SamplingParams(temperature=0.8, seed=99), max_tokens=24)
    survivor = Job(tuple(model.encode_prompt("One, two,")), SamplingParams(temperature=0.8, seed=5), max_tokens=8)

    scheduler = Scheduler(model, 4)
    try:
        alone = run_jobs(scheduler, [greedy])[0]
        survivor_alone = run_jobs(scheduler, [survivor])[0]

        # nan_later: its 3rd token's logits are NaN (a decode step); out_of_vocab: its sampler
        # returns a padding id past the vocabulary at once (the prefill step), as sampling an
        # embedding row without a token did before load refused such files
        seen = {"nan": 0}
        allowed, real_choose = scheduler._allowed, sched.choose

        def poisoned_allowed(logits, job):
            if job is nan_later:
                seen["nan"] += 1
                if seen["nan"] == 3:
                    return torch.full_like(logits, math.nan)
            return allowed(logits, job)

        def padding_choose(logits, params, history=(), generator=None):
            if params.seed == 99:
                return torch.tensor(model.config.n_vocab + 10, device=logits.device)
            return real_choose(logits, params, history, generator)

        monkeypatch.setattr(scheduler, "_allowed", poisoned_allowed)
        monkeypatch.setattr(sched, "choose", padding_choose)
        together = run_jobs(scheduler, [greedy, nan_later, out_of_vocab, survivor])
    finally:
        scheduler.close()

    g, n, o, s = together
    assert isinstance(alone[-1], Done) and isinstance(g[-1], Done)
    assert _text(g) == _text(alone) and g[-1].n_completion == alone[-1].n_completion == 24
    assert isinstance(s[-1], Done) and _text(s) == _text(survivor_alone)
    assert isinstance(n[-1], Failed) and "not finite" in n[-1].message, n[-1]
    assert len([e for e in n if isinstance(e, (Done, Failed))]) == 1
    assert isinstance(o[-1], Failed) and "outside the vocabulary" in o[-1].message, o[-1]
    assert seen["nan"] == 3
