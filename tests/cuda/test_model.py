"""The CUDA model path (CudaModel) against the float64 reference forward pass, on small
Llama models quantized by llama.cpp's own quantizer. Without a GPU the same code runs
on the CPU through Triton's interpreter (slow: few tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gguflm
from gguflm.model.config import ModelConfig
from gguflm.model.cuda import load_cuda
from gguflm.quant.triton.gemm import gemm_config
from gguflm.verify.reference import reference_logits

IDS = [1, 450, 439, 293, 110, 289]  # "<s>The quick brown" in the llama SPM vocabulary (first 512 tokens)


def _load(path, device, **kw):
    f = gguflm.GGUFFile(path)
    cfg = ModelConfig.from_gguf(f)
    return load_cuda(f, cfg, 32, device, **kw)


def _llm(m):
    """The engine's LLM around a model loaded here (its tokenizer from the same file)."""
    from gguflm.engine.llm import LLM

    return LLM(m, gguflm.Tokenizer.from_gguf(m.file))


def _served(m, jobs: list, replay: bool = False, **kw) -> tuple[list, dict]:
    """Run ``jobs`` through a Scheduler of ``m`` built with ``kw`` (paged keywords: the cache
    must be paged and the steps mixed; ``replay``: generated tokens fed again as decode rows
    after a preemption) -> (each job's events, the metrics snapshot)."""
    from gguflm.engine.scheduler import Scheduler, run_jobs

    sched = Scheduler(_llm(m), **kw)
    try:
        if "block_size" in kw:
            assert sched.cache.paged and sched._mixed
        if replay:
            assert sched._kind_replay
        return run_jobs(sched, jobs), sched.metrics.snapshot()
    finally:
        sched.close()


def _result(events) -> tuple:
    """A request's (tokens, [(id, logprob)] per piece, kept logits) from its events."""
    from gguflm.engine.scheduler import Piece

    lps = [(lp.id, lp.logprob) for e in events if isinstance(e, Piece) for lp in e.logprobs]
    return events[-1].tokens, lps, events[-1].logits


def _agree(logits: torch.Tensor, ref: np.ndarray, tol: float) -> None:
    """Same top-1 everywhere, and every logit within ``tol`` of the reference, in units
    of the reference's standard deviation per row."""
    ref_t = torch.from_numpy(ref)
    got = logits.double().cpu()
    assert torch.equal(got.argmax(-1), ref_t.argmax(-1))
    err = (got - ref_t).abs().max(-1).values / ref_t.std(-1)
    assert float(err.max()) < tol, float(err.max())


@pytest.fixture(scope="module", params=["Q4_K_M", "Q4_0"])
def model_and_ref(request, tiny_model, device):
    path = tiny_model(request.param)
    return _load(path, device), reference_logits(path, IDS)


def test_weights_stay_in_their_gguf_encoding(model_and_ref):
    m, _ = model_and_ref
    w = m.weights
    assert w.fallback == {}
    names = [n for n, i in m.file.tensors.items() if len(i.shape) == 2]
    assert w.nbytes == sum(m.file.tensors[n].nbytes for n in names)


def test_prefill_logits_match_reference(model_and_ref):
    m, ref = model_and_ref
    _agree(m.logits(IDS), ref, tol=2e-2)          # float16 activations into the matmuls


def test_one_sequence_prefill_runs_the_unsplit_gemm(tiny_model, device, monkeypatch):
    """A prompt read alone (forward_plain) takes the fused GEMM without split-K
    (weights.one_sequence), also for a weight whose own launch shape splits K (the FFN
    down projection here), and its logits follow the float64 reference."""
    import gguflm.model.cuda.weights as weights

    monkeypatch.setenv("GGUFLM_MATMUL", "gemm")
    path = tiny_model("Q4_K_M")
    m = _load(path, device)
    assert any(gemm_config(layer.w_down.packed).splits > 1 for layer in m.weights.layers)
    splits = []
    for name in ("gemm", "gemm_gated"):
        real = getattr(weights, name)

        def spy(*args, _real=real, **kw):
            splits.append(kw["config"].splits if kw.get("config") is not None else None)
            return _real(*args, **kw)
        monkeypatch.setattr(weights, name, spy)
    _agree(m.logits(IDS), reference_logits(path, IDS), tol=2e-2)
    assert splits and set(splits) == {1}, splits


def test_decode_steps_match_reference(model_and_ref):
    m, ref = model_and_ref
    cache = m.new_cache(1)
    slots = torch.zeros(1, dtype=torch.long, device=m.device)
    m.forward(torch.tensor([IDS[:3]], device=m.device), torch.arange(3, device=m.device)[None], cache, slots,
              last_only=True)
    steps = []
    for p in range(3, len(IDS)):
        out = m.forward(torch.tensor([[IDS[p]]], device=m.device), torch.tensor([[p]], device=m.device), cache,
                        slots, last_only=True)
        steps.append(out[0].clone())
    _agree(torch.stack(steps), ref[3:], tol=1e-2)   # float32 steps over a prefill-made float16 KV cache


def test_continued_prefill_matches_reference(model_and_ref):
    m, ref = model_and_ref
    cache = m.new_cache(1)
    slots = torch.zeros(1, dtype=torch.long, device=m.device)
    m.forward(torch.tensor([IDS[:2]], device=m.device), torch.arange(2, device=m.device)[None], cache, slots)
    out = m.forward(torch.tensor([IDS[2:]], device=m.device), torch.arange(2, len(IDS), device=m.device)[None],
                    cache, slots)
    _agree(out[0], ref[2:], tol=2e-2)


def test_padded_batch_matches_reference(model_and_ref):
    m, ref = model_and_ref
    cache = m.new_cache(2)
    n = len(IDS)
    tokens = torch.tensor([IDS, IDS[:3] + [0] * (n - 3)], device=m.device)
    positions = torch.tensor([list(range(n)), [0, 1, 2] + [-1] * (n - 3)], device=m.device)
    out = m.forward(tokens, positions, cache, torch.tensor([1, 0], device=m.device), last_only=True)
    _agree(out, ref[[n - 1, 2]], tol=2e-2)


def test_greedy_decoding_follows_the_reference(model_and_ref):
    m, ref = model_and_ref
    cache = m.new_cache(1)
    m.prefill(IDS[:-1], cache)
    got = m.decode_greedy(IDS[-1], len(IDS) - 1, 2, cache).tolist()
    first = int(np.argmax(ref[-1]))
    assert got[0] == first
    ref2 = reference_logits(m.file, IDS + [first])
    assert got[1] == int(np.argmax(ref2[-1]))


def test_unsupported_types_fall_back_to_float16(tiny_model, device):
    path = tiny_model("F16")
    m = _load(path, device)
    assert set(m.weights.fallback.values()) == {"F16"}
    _agree(m.logits(IDS[:4]), reference_logits(path, IDS[:4]), tol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_graph_replay_equals_eager_steps(tiny_model):
    path = tiny_model("Q4_K_M")
    runs = []
    for graphs in (False, True):
        m = _load(path, torch.device("cuda"), use_graphs=graphs)
        cache = m.new_cache(1)
        m.prefill(IDS, cache)
        runs.append(m.decode_greedy(IDS[-1], len(IDS) - 1, 8, cache).tolist())
    assert runs[0] == runs[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_captured_prefill_equals_eager(tiny_model):
    """A run of tokens from p0 > 0: eager, then captured, then replayed."""
    m = _load(tiny_model("Q4_0"), torch.device("cuda"))
    cache = m.new_cache(1)
    slots = torch.zeros(1, dtype=torch.long, device="cuda")
    m.forward(torch.tensor([IDS[:2]], device="cuda"), torch.arange(2, device="cuda")[None], cache, slots)
    tokens = torch.tensor([IDS[2:]], device="cuda")
    positions = torch.arange(2, len(IDS), device="cuda")[None]
    outs = [m.forward(tokens, positions, cache, slots).clone() for _ in range(3)]  # eager, capture, replay
    assert len(m._prefills) == 1 and m._prefills[next(iter(m._prefills))] is not None
    assert torch.allclose(outs[0], outs[1], atol=1e-4) and torch.equal(outs[1], outs[2])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_new_prompts_replay_their_bucket_graph(tiny_model):
    """Prompts read from position 0 run their length bucket's graph, captured on the first
    one: prompts of other lengths in the bucket replay it, their logits (padding rows past
    the prompt) follow the float64 reference, and greedy decoding after a padded prompt
    follows it too."""
    from gguflm.model.cuda.model import prefill_bucket

    path = tiny_model("Q4_K_M")
    m = _load(path, torch.device("cuda"))
    cache = m.new_cache(1)
    slots = torch.zeros(1, dtype=torch.long, device="cuda")
    for n in (len(IDS), 4, 9):
        ids = (IDS * 2)[:n]
        assert prefill_bucket(n, 32) == 16
        out = m.forward(torch.tensor([ids], device="cuda"), torch.arange(n, device="cuda")[None], cache, slots,
                        last_only=True)
        _agree(out, reference_logits(path, ids)[-1:], tol=2e-2)
        assert len(m._buckets) == 1 and not m._prefills
    full = m.forward(torch.tensor([IDS], device="cuda"), torch.arange(len(IDS), device="cuda")[None], cache, slots)
    assert full.shape == (1, len(IDS), m.config.n_vocab) and len(m._buckets) == 2
    _agree(full[0], reference_logits(path, IDS), tol=2e-2)
    m.forward(torch.tensor([IDS[:-1]], device="cuda"), torch.arange(len(IDS) - 1, device="cuda")[None], cache, slots,
              last_only=True)                          # padded: garbage keys/values past position 4
    got = m.decode_greedy(IDS[-1], len(IDS) - 1, 2, cache).tolist()
    first = int(np.argmax(reference_logits(path, IDS)[-1]))
    assert got[0] == first
    assert got[1] == int(np.argmax(reference_logits(path, IDS + [first])[-1]))


def test_batched_decode_rows_follow_their_own_sequences(model_and_ref):
    """Two sequences of different lengths in slots 2 and 0 of a three-slot cache, stepped
    together (one token each: the batched decode step): each row
    agrees with the float64 reference over its own sequence, and with the one-row step."""
    m, ref = model_and_ref
    cache = m.new_cache(3)
    a, b = IDS, IDS[:4]
    for slot, ids in ((2, a[:-1]), (0, b[:-1])):
        m.forward(torch.tensor([ids], device=m.device), torch.arange(len(ids), device=m.device)[None], cache,
                  torch.tensor([slot], device=m.device))
    out = m.forward(torch.tensor([[a[-1]], [b[-1]]], device=m.device),
                    torch.tensor([[len(a) - 1], [len(b) - 1]], device=m.device), cache,
                    torch.tensor([2, 0], device=m.device), last_only=True)
    _agree(out, ref[[len(a) - 1, len(b) - 1]], tol=2e-2)
    one = m.forward(torch.tensor([[b[-1]]], device=m.device), torch.tensor([[len(b) - 1]], device=m.device), cache,
                    torch.tensor([0], device=m.device), last_only=True)
    _agree(one, ref[[len(b) - 1]], tol=2e-2)


def test_paged_batched_step_equals_contiguous(model_and_ref):
    """The batched step over a paged cache (blocks of 4 positions, the two sequences'
    blocks interleaved in the pool) and over the contiguous cache: both caches prefilled
    by the same padded-rows forward, then three greedy one-token steps of both rows and
    one of a single row: the same logits to the bit (the decode kernel finds each position
    through the block table), and the first step agrees with the float64 reference."""
    m, ref = model_and_ref
    dev = m.device
    a, b = IDS, IDS[:4]
    slots = torch.tensor([2, 0], device=dev)
    outs = []
    for cache in (m.new_cache(3), m.new_cache(3, block_size=4, n_blocks=12)):
        if cache.paged:
            for n in (4, 8, 12):                  # slot 0 and slot 2 take turns: blocks out of order
                assert cache.reserve(0, n) and cache.reserve(2, n)
        tokens = torch.tensor([a[:-1], b[:-1] + [0] * 2], device=dev)
        positions = torch.tensor([list(range(5)), [0, 1, 2, -1, -1]], device=dev)
        m.forward(tokens, positions, cache, slots, last_only=True)
        toks, pos, got = [a[-1], b[-1]], [len(a) - 1, len(b) - 1], []
        for _ in range(3):
            logits = m.forward(torch.tensor(toks, device=dev)[:, None], torch.tensor(pos, device=dev)[:, None],
                               cache, slots, last_only=True).clone()
            got.append(logits)
            toks, pos = logits.argmax(-1).tolist(), [p + 1 for p in pos]
        # one row alone: over a paged cache the batched step (width 2, a padding row); over
        # the contiguous one forward() would take the one-sequence path, so ask for the step
        one = (torch.tensor([toks[1]], device=dev), torch.tensor([pos[1]], device=dev), slots[1:])
        got.append((m.forward(one[0][:, None], one[1][:, None], cache, one[2], last_only=True) if cache.paged
                    else m.batched(cache, 1).step(*one)).clone())
        outs.append(got)
    _agree(outs[1][0], ref[[len(a) - 1, len(b) - 1]], tol=2e-2)
    for flat, paged in zip(*outs):
        assert torch.equal(flat, paged)


def test_paged_scheduler_preempts_and_follows_the_reference(tiny_model, device):
    """Served through the scheduler over a paged cache (opt-in on this path) of 6 blocks
    of 4 positions, 3 requests of 8 greedy tokens cannot all grow: some are preempted and
    resumed (their prompt and generated tokens prefilled again). Every request finishes,
    every generated token is the float64 reference's choice (or within a near-tie of it)
    over the request's own tokens, the preemptions are counted and the pool is whole again."""
    from gguflm.engine.sampling import SamplingParams
    from gguflm.engine.scheduler import Done, Job, Scheduler, run_jobs

    path = tiny_model("Q4_K_M")
    m = _load(path, device)
    m.use_paged_cache(True)
    greedy = SamplingParams(temperature=0)
    prompts = [IDS[:4], IDS[1:6], IDS[2:6]]
    jobs = [Job(tuple(p), greedy, 8, ignore_eos=True) for p in prompts]
    sched = Scheduler(_llm(m), n_slots=3, n_ctx=32, block_size=4, kv_blocks=6, prefill_chunk=4)
    try:
        assert sched.cache.paged
        events = run_jobs(sched, jobs)
        snap = sched.metrics.snapshot()
        kv = sched.kv_stats()
    finally:
        sched.close()
    assert snap["preemptions"] > 0, "the pool never ran out: the test proves nothing"
    assert kv["blocks_used"] == 0 and kv["blocks_free"] + kv["blocks_cached"] == kv["blocks_total"]
    for prompt, evs in zip(prompts, events):
        done = evs[-1]
        assert isinstance(done, Done) and done.finish_reason == "length" and len(done.tokens) == 8
        ref = reference_logits(path, list(prompt) + list(done.tokens[:-1]))[len(prompt) - 1:]   # row i chose token i
        for row, tok in zip(ref, done.tokens):
            assert row.max() - row[tok] <= 2e-2 * row.std(), (prompt, done.tokens)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_batched_graph_equals_eager_batched_steps(tiny_model):
    """Greedy tokens of three sequences stepped together (width 4, one padding row) from
    the captured graph equal those of the same steps run eagerly."""
    path = tiny_model("Q4_K_M")
    runs = []
    for graphs in (False, True):
        m = _load(path, torch.device("cuda"), use_graphs=graphs)
        cache = m.new_cache(4)
        starts = {3: IDS[:5], 0: IDS[:3], 1: IDS[1:7]}
        for slot, ids in starts.items():
            m.forward(torch.tensor([ids], device="cuda"), torch.arange(len(ids), device="cuda")[None], cache,
                      torch.tensor([slot], device="cuda"))
        slots = torch.tensor(list(starts), device="cuda")
        toks = [IDS[-1]] * 3
        pos = [len(ids) for ids in starts.values()]
        got = []
        for _ in range(6):
            logits = m.forward(torch.tensor(toks, device="cuda")[:, None], torch.tensor(pos, device="cuda")[:, None],
                               cache, slots, last_only=True)
            toks = logits.argmax(-1).tolist()
            pos = [p + 1 for p in pos]
            got.append(toks)
        runs.append(got)
    assert runs[0] == runs[1]


def test_batched_step_rows_are_width_invariant(tiny_model, device, monkeypatch):
    """With the fused GEMM (the default; its split-K in the FFN down projection here) every
    linear of the model is packed, so the batched step's rows do not depend on the width:
    a sequence's logits are the same bits at widths 2, 4 and 8, at another place in the
    batch beside other sequences (and padding rows)."""
    monkeypatch.setenv("GGUFLM_MATMUL", "gemm")
    m = _load(tiny_model("Q4_K_M"), device)
    assert m.decode_width_free
    assert max(gemm_config(lin.packed).splits for lin in m.weights.layers[0].linears()) > 1
    cache = m.new_cache(8)
    prompts = {0: [1, 450, 439], 1: [1, 293, 110, 289], 2: [1, 17], 3: [1, 450, 439, 293, 110], 4: [1, 99, 98]}
    n = max(map(len, prompts.values()))
    tokens = torch.tensor([p + [0] * (n - len(p)) for p in prompts.values()], device=device)
    positions = torch.tensor([list(range(len(p))) + [-1] * (n - len(p)) for p in prompts.values()], device=device)
    m.forward(tokens, positions, cache, torch.tensor(list(prompts), device=device), last_only=True)

    def step(slots: list[int]) -> torch.Tensor:
        toks = torch.tensor([[7 + s] for s in slots], device=device)
        pos = torch.tensor([[len(prompts[s])] for s in slots], device=device)
        return m.forward(toks, pos, cache, torch.tensor(slots, device=device), last_only=True).clone()

    two = step([3, 1])                  # width 2
    three = step([1, 2, 3])             # width 4, one padding row
    five = step([0, 1, 2, 3, 4])        # width 8, three padding rows
    assert torch.equal(two[0], three[2]) and torch.equal(two[0], five[3])
    assert torch.equal(two[1], three[0]) and torch.equal(two[1], five[1])
    assert {k[1] for k in m._batched} == {2, 4, 8}


def test_row_chunked_matmul_equals_whole(model_and_ref):
    """A many-token matmul dequantizing its weight 64 rows at a time (as the output
    projection does) gives the same float16 product as one whole-weight dequantization."""
    m, _ = model_and_ref
    lin = m.weights.layers[0].w_gate
    assert lin.n_out > 64
    h = torch.randn(3, lin.n_in, generator=torch.Generator().manual_seed(0)).half().to(m.device)
    whole = lin.matmul(h, m.weights.workspace).float()
    pieces = lin.matmul(h, m.weights.workspace, row_chunk=64).float()
    assert (pieces - whole).abs().max() <= 1e-3 * whole.abs().max()


@pytest.mark.parametrize("matmul", ["cublas", "gemm"])
def test_scheduler_output_alone_equals_among_others(model_and_ref, matmul, monkeypatch):
    """Served through the scheduler (which runs every one-token step through the batched
    step, reads one prompt per forward and reuses no cached keys), a request's greedy
    tokens and their log-probabilities are bit-for-bit the same alone as among others
    that start, run and stop at other times (a shared prompt prefix included). With the
    fused GEMM the steps run at the width of the live rows (alone: 2, of 4 slots); with
    cuBLAS (rounding by shape) all at the width of all slots. Without mixed steps
    (``GGUFLM_CUDA_MIXED=0``; with them: test_mixed_scheduler_alone_equals_among_others)."""
    from gguflm.engine.sampling import SamplingParams
    from gguflm.engine.scheduler import Job, Piece

    m, _ = model_and_ref
    monkeypatch.setenv("GGUFLM_MATMUL", matmul)
    monkeypatch.setattr(m, "mixed_steps", False)
    if matmul == "gemm" and m.device.type == "cpu" and "Q4_0" in str(m.file.path):
        pytest.skip("one quantization is enough in Triton's interpreter (slow)")
    greedy = SamplingParams(temperature=0)
    target = Job(tuple(IDS[:6]), greedy, 10, top_logprobs=0)
    others = [Job(tuple(IDS[:4]), greedy, 3), Job(tuple(IDS[:6] + IDS[1:3]), greedy, 14),
              Job(tuple(IDS[2:5]), greedy, 6)]

    def served(jobs: list[Job]) -> list:
        return _served(m, jobs, n_slots=4, n_ctx=32, prefill_chunk=4)[0]

    m._batched.clear()
    alone = served([target])[0]
    assert {k[1] for k in m._batched} == ({2} if matmul == "gemm" else {4})
    together = served(others[:2] + [target] + others[2:])[2]
    assert not m.batch_invariant and m.decode_width_free == (matmul == "gemm")

    def logprobs(events) -> list:
        return [(lp.id, lp.logprob) for e in events if isinstance(e, Piece) for lp in e.logprobs]

    assert len(logprobs(alone)) == 10 and logprobs(alone) == logprobs(together)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_seeded_sampling_on_the_gpu(tiny_model):
    """Temperature > 0 on the GPU: the sampling chain runs there with the request's CUDA
    generator; the same seed gives the same tokens."""
    from gguflm.engine.sampling import SamplingParams

    llm = _llm(_load(tiny_model("Q4_K_M"), torch.device("cuda")))
    params = SamplingParams(temperature=0.9, seed=7)

    def tokens() -> list[int]:
        s = llm.stream(IDS, 12, params)
        list(s)
        return s.result.tokens

    runs = [tokens() for _ in range(2)]
    assert len(runs[0]) > 0 and runs[0] == runs[1]


def test_running_ahead_equals_step_by_step(model_and_ref):
    """The one-slot loop running ahead (each step fed the id the device chose, through
    ``decode_one``: on a GPU the decode graph fed by device copies; read one step late)
    gives the tokens of the loop that reads each id before the next step: greedy to a
    full context, seeded sampling, max_tokens, one request after another."""
    from gguflm.engine.llm import TextStream
    from gguflm.engine.sampling import SamplingParams
    from gguflm.engine.scheduler import Job, Scheduler

    m, _ = model_and_ref
    llm = _llm(m)
    greedy = SamplingParams(temperature=0)
    jobs = [Job(tuple(IDS), greedy, None, ignore_eos=True), Job(tuple(IDS[:4]), SamplingParams(temperature=0.9, seed=3), 4),
            Job(tuple(IDS[:5]), greedy, 3)]

    def run(pipeline: bool) -> list:
        sched = Scheduler(llm, 1, 12, start=False, pipeline=pipeline)
        out = []
        for job in jobs:
            s = TextStream(sched, job)
            out.append(("".join(s), s.result.tokens, s.result.finish_reason))
        return out

    ahead = run(True)
    assert ahead == run(False)
    assert len(ahead[0][1]) == 7 and ahead[0][2] == "length"   # n_ctx 12: 6 prompt + 6 fed, a 7th chosen


@pytest.fixture(scope="module")
def mixed_model(tiny_model, device):
    """The Q4_K_M tiny model loaded with mixed steps on (``GGUFLM_CUDA_MIXED=1``) and its path."""
    path = tiny_model("Q4_K_M")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GGUFLM_CUDA_MIXED", "1")
        m = _load(path, device)
    assert m.mixed_steps
    return m, path


def test_mixed_step_rows_equal_one_token_steps(mixed_model, monkeypatch):
    """Mixed steps (``forward`` with ``select``: one-token rows that may share slots, the
    batched step's keys/values stored before its attention): prompt a (6 tokens, slot 2)
    whole in one step beside the first 2 tokens of prompt b (slot 0), then b's last 2
    tokens beside a's first decode row; and the same tokens one per step in pairs of other
    company. Every token's logits the same to the bit, over the contiguous cache and over
    a paged one (blocks of 4, interleaved), and a's agree with the float64 reference. The
    fused GEMM (the default on a GPU) makes the rows independent of the step's width."""
    m, path = mixed_model
    monkeypatch.setenv("GGUFLM_MATMUL", "gemm")
    assert m.batch_invariant and m.flat_steps
    dev = m.device
    a, b = IDS, IDS[:4]
    ref = reference_logits(path, a)
    nxt = int(np.argmax(ref[-1]))

    def steps(cache, plan):
        """plan: steps of rows (slot, position, token); -> {(slot, position): logits}"""
        got = {}
        for rows in plan:
            t = torch.tensor([[tok] for _, _, tok in rows], device=dev)
            p = torch.tensor([[pos] for _, pos, _ in rows], device=dev)
            s = torch.tensor([slot for slot, _, _ in rows], device=dev)
            out = m.forward(t, p, cache, s, select=torch.arange(len(rows), device=dev)).cpu()
            got.update({(slot, pos): out[i] for i, (slot, pos, _) in enumerate(rows)})
        return got

    rows_a = [(2, i, tok) for i, tok in enumerate(a)] + [(2, len(a), nxt)]
    rows_b = [(0, i, tok) for i, tok in enumerate(b)]
    plans = {"mixed": [rows_a[:6][::-1] + rows_b[:2], rows_b[2:] + rows_a[6:]],
             "one per step": [[ra, rb] for ra, rb in zip(rows_a, rows_b)] + [[r] for r in rows_a[4:]]}
    runs = {}
    for name, plan in plans.items():
        for paged in (False, True):
            cache = m.new_cache(3, block_size=4, n_blocks=12) if paged else m.new_cache(3)
            if paged:
                for n in (4, 8):                  # slot 0 and slot 2 take turns: blocks out of order
                    assert cache.reserve(0, n) and cache.reserve(2, n)
            runs[name, paged] = steps(cache, plan)
    want = runs["one per step", False]
    assert len(want) == len(rows_a) + len(rows_b)
    for key, got in runs.items():
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), key
    _agree(torch.stack([want[2, i] for i in range(len(a))]), ref, tol=2e-2)
    _agree(want[2, len(a)][None], reference_logits(path, a + [nxt])[-1:], tol=2e-2)


@pytest.mark.parametrize("decode_rows", ["gemm", "gemv"])
def test_mixed_scheduler_alone_equals_among_others(mixed_model, monkeypatch, decode_rows):
    """The scheduler's mixed steps on this path (``GGUFLM_CUDA_MIXED=1`` over the
    batch-invariant kernels, a paged cache of blocks of 4): four requests, each alone with
    its prompt read in one chunk, and together on 3 slots with prompts cut into chunks of
    2 under a budget of 5 tokens per step beside the others' decode rows (the last one
    admitted when the first ends, its prompt head reused from blocks that the others
    published: prefix caching): every request's greedy tokens,
    log-probabilities and logits the same to the bit, and each chosen token the float64
    reference's (or within a near-tie of it), with a small KL divergence to it."""
    from gguflm.engine.sampling import SamplingParams
    from gguflm.engine.scheduler import Job

    m, path = mixed_model
    monkeypatch.setenv("GGUFLM_MATMUL", "gemm")
    monkeypatch.setattr(m, "decode_rows", decode_rows == "gemv")   # GGUFLM_CUDA_DECODE_ROWS=gemv: row kinds
    assert m.batch_invariant and m.flat_steps and m.row_kinds == (decode_rows == "gemv")
    greedy = SamplingParams(temperature=0)
    jobs = [Job(tuple(IDS[:4]), greedy, 3, top_logprobs=0, keep_logits=True),
            Job(tuple(IDS[:6] + IDS[1:3]), greedy, 9, top_logprobs=0, keep_logits=True),
            Job(tuple(IDS[2:5]), greedy, 5, top_logprobs=0, keep_logits=True),
            Job(tuple(IDS[:6]), greedy, 7, top_logprobs=0, keep_logits=True)]

    def served(jobs: list[Job], chunk: int, budget: int) -> list:
        return _served(m, jobs, n_slots=3, n_ctx=32, block_size=4, prefill_chunk=chunk, prefill_budget=budget)[0]

    m.use_paged_cache(True)
    try:
        events = served(jobs, 2, 5)
        together = [_result(ev) for ev in events]
        alone = [_result(served([job], 16, 512)[0]) for job in jobs]
    finally:
        m.use_paged_cache(False)
    assert events[-1][-1].n_cached == 4                  # its first block: the others' keys/values
    for job, (toks, lps, logits), (toks1, lps1, logits1) in zip(jobs, together, alone):
        assert len(toks) == job.max_tokens and toks == toks1 and lps == lps1
        assert all(torch.equal(x, y) for x, y in zip(logits, logits1))
        ref = torch.from_numpy(reference_logits(path, list(job.prompt) + list(toks[:-1]))[len(job.prompt) - 1:])
        got = torch.stack(logits).double()
        for row, tok in zip(ref, toks):
            assert row.max() - row[tok] <= 2e-2 * row.std(), (job.prompt, toks)
        kl = (ref.softmax(-1) * (ref.log_softmax(-1) - got.log_softmax(-1))).sum(-1)
        assert float(kl.max()) < 1e-5, float(kl.max())   # ~3e-8 for whole-prompt logits here


# ---- GGUFLM_CUDA_DECODE_ROWS=gemv: the batched step's decode rows through the rows GEMV ----

def _kl(ref: np.ndarray, got: torch.Tensor) -> float:
    ref_t = torch.from_numpy(ref).double()
    return float((ref_t.softmax(-1) * (ref_t.log_softmax(-1) - got.double().cpu().log_softmax(-1))).sum(-1).max())


@pytest.fixture(scope="module")
def rows_model(tiny_model, device):
    """The Q4_K_M tiny model loaded with ``GGUFLM_CUDA_DECODE_ROWS=gemv`` (decode rows through
    the GEMV), and its path."""
    path = tiny_model("Q4_K_M")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GGUFLM_CUDA_DECODE_ROWS", "gemv")
        m = _load(path, device)
    assert m.row_kinds and m.decode_rows
    return m, path


PROMPTS = {0: [1, 450, 439], 1: [1, 293, 110, 289], 2: [1, 17], 3: [1, 450, 439, 293, 110], 4: [1, 99, 98],
           5: [1, 33], 6: [1, 289, 17, 5], 7: [1, 7]}


def _prefill(m, cache, device) -> None:
    n = max(map(len, PROMPTS.values()))
    tokens = torch.tensor([p + [0] * (n - len(p)) for p in PROMPTS.values()], device=device)
    positions = torch.tensor([list(range(len(p))) + [-1] * (n - len(p)) for p in PROMPTS.values()], device=device)
    m.forward(tokens, positions, cache, torch.tensor(list(PROMPTS), device=device), last_only=True)


def _rows(slots, device):
    """The decode rows of ``slots``: token 7 + slot at the position after the slot's prompt."""
    return (torch.tensor([7 + s for s in slots], device=device), torch.tensor([len(PROMPTS[s]) for s in slots],
                                                                              device=device),
            torch.tensor(slots, device=device))


def test_decode_rows_through_the_gemv_are_width_invariant(rows_model, device):
    """With decode rows through the GEMV, a sequence's decode row gives the same bits in
    steps of 1, 2, 3 and 8 rows (decode widths 1, 2, 4, 8: padding rows beside it), at any
    place among other sequences; each row agrees with the float64 reference over its own
    sequence (KL <= 1e-4)."""
    m, path = rows_model
    cache = m.new_cache(8)
    _prefill(m, cache, device)
    m._batched.clear()

    def step(slots: list[int]) -> torch.Tensor:
        t, p, s = _rows(slots, device)
        if len(slots) == 1:                   # forward() takes one row of a contiguous cache to the decode graph
            return m.batched(cache, 1, width=1, decode_width=1).step(t, p, s)[:1].clone()
        return m.forward(t[:, None], p[:, None], cache, s, last_only=True).clone()

    one = step([3])
    two = step([3, 1])
    three = step([1, 2, 3])
    eight = step([7, 6, 5, 4, 3, 2, 1, 0])
    assert torch.equal(one[0], two[0]) and torch.equal(one[0], three[2]) and torch.equal(one[0], eight[4])
    assert torch.equal(two[1], three[0]) and torch.equal(two[1], eight[6])
    assert torch.equal(three[1], eight[5])
    assert {(k[1], k[2]) for k in m._batched} == {(1, 1), (2, 2), (4, 4), (8, 8)}
    for i, s in enumerate([7, 6, 5, 4, 3, 2, 1, 0]):
        ref = reference_logits(path, PROMPTS[s] + [7 + s])[-1:]
        _agree(eight[i:i + 1], ref, tol=2e-2)
        assert _kl(ref, eight[i:i + 1]) <= 1e-4


def test_mixed_step_leaves_decode_rows_unchanged(rows_model, device):
    """A mixed step (3 decode rows, then a 5-token prompt chunk of another sequence as
    prompt rows through the GEMM) gives the decode rows the bits they have alone (a
    one-row step); the chunk's last row agrees with the float64 reference of its prompt."""
    m, path = rows_model
    cache = m.new_cache(9)
    _prefill(m, cache, device)
    dec = [2, 0, 5]
    alone = [m.batched(cache, 1, width=1, decode_width=1).step(*_rows([s], device))[:1].clone() for s in dec]
    t, p, s = _rows(dec, device)
    chunk = [1, 450, 439, 293, 110]
    tokens = torch.cat([t, torch.tensor(chunk, device=device)])
    positions = torch.cat([p, torch.arange(5, device=device)])
    slots = torch.cat([s, torch.full((5,), 8, device=device)])
    select = torch.tensor([0, 1, 2, 7], device=device)
    out = m.forward(tokens[:, None], positions[:, None], cache, slots, select=select, n_decode=3).cpu()
    from gguflm.model.cuda.batched import MIXED_DECODE_WIDTH, MIXED_PROMPT_WIDTH

    # decode width 4 and prompt width 8, padded to a mixed step's buckets (batched.step_shape)
    assert any(k[1:3] == (MIXED_DECODE_WIDTH + MIXED_PROMPT_WIDTH, MIXED_DECODE_WIDTH) for k in m._batched)
    for i in range(3):
        assert torch.equal(out[i], alone[i][0].cpu())
    _agree(out[3:], reference_logits(path, chunk)[-1:], tol=2e-2)
    # the output head over 2 of the 8 prompt rows (the selected one and a filler): the same rows
    step = m.batched(cache, 8, width=12, decode_width=4, head_rows=2)
    assert (step.hp, step.pw) == (2, 8)
    at = step.head_rows(select.tolist(), 3)
    step.step(tokens, positions, slots, n_decode=3)
    head = step.select_rows(select, 3, at).cpu()
    assert torch.equal(head[:3], out[:3])
    assert torch.allclose(head[3:], out[3:], rtol=0, atol=1e-5 * float(out[3:].abs().max()))  # torch matmul here
    # a step of prompt rows only (no decode rows), the head over 2 of its 8 rows: the same rows
    rows = (tokens[3:], positions[3:], slots[3:])
    whole = m.batched(cache, 5, width=8)
    assert whole.hp == whole.pw == 8
    whole.step(*rows)
    full = whole.select_rows(select[3:] - 3, 0).cpu()
    step = m.batched(cache, 5, width=8, head_rows=2)
    assert (step.hp, step.pw, step.dw) == (2, 8, 0)
    at = step.head_rows([4], 0)
    step.step(*rows)
    head = step.select_rows(select[3:] - 3, 0, at).cpu()
    assert torch.allclose(head, full, rtol=0, atol=1e-5 * float(full.abs().max()))  # torch matmul here
    assert torch.allclose(head, out[3:], rtol=0, atol=1e-5 * float(full.abs().max()))
    # the same step without n_decode: every row a prompt row (today's arithmetic), decode rows not bitwise the GEMV's
    again = m.forward(tokens[:, None], positions[:, None], cache, slots, select=select).cpu()
    _agree(again[3:], reference_logits(path, chunk)[-1:], tol=2e-2)


def test_a_lone_decode_row_is_the_one_row_decode_step(rows_model, device):
    """A decode row alone (decode width 1, as a lone request on a server) runs the ops of
    the one-row decode step (Token: generate()'s graphs) over one row: the same logits to
    the bit as that step from the same cache."""
    m, _ = rows_model
    cache = m.new_cache(8)
    _prefill(m, cache, device)
    slot = 3
    t, p, s = _rows([slot], device)
    rows = m.batched(cache, 1, width=1, decode_width=1).step(t, p, s)[:1].clone()
    g = m.graphs(cache, slot)
    g.tok[0], g.pos[0] = int(t[0]), int(p[0])
    g.step(0)
    assert torch.equal(rows[0], g.buf.logits_buf)


def test_mixed_scheduler_with_decode_rows_preempts_bit_identically(mixed_model, monkeypatch):
    """Decode rows through the GEMV (row kinds) over a paged cache of 6 blocks of 4: three
    requests of 8 greedy tokens cannot all grow, some are preempted and resumed (prompt
    read again as prompt rows, generated tokens fed again as decode rows, one per step).
    Every request's tokens, log-probabilities and logits are the same to the bit as alone
    on a large pool, and each chosen token is the float64 reference's (or a near-tie)."""
    from gguflm.engine.sampling import SamplingParams
    from gguflm.engine.scheduler import Job

    m, path = mixed_model
    monkeypatch.setenv("GGUFLM_MATMUL", "gemm")
    monkeypatch.setattr(m, "decode_rows", True)
    greedy = SamplingParams(temperature=0)
    prompts = [IDS[:4], IDS[1:6], IDS[2:6]]
    jobs = [Job(tuple(p), greedy, 8, ignore_eos=True, top_logprobs=0, keep_logits=True) for p in prompts]

    def served(jobs: list[Job], blocks: int) -> tuple[list, dict]:
        return _served(m, jobs, replay=True, n_slots=3, n_ctx=32, block_size=4, kv_blocks=blocks, prefill_chunk=4)

    m.use_paged_cache(True)
    try:
        events, snap = served(jobs, 6)
        alone = [_result(served([job], 24)[0][0]) for job in jobs]
    finally:
        m.use_paged_cache(False)
    assert snap["preemptions"] > 0, "the pool never ran out: the test proves nothing"
    for prompt, ev, (toks1, lps1, logits1) in zip(prompts, events, alone):
        toks, lps, logits = _result(ev)
        assert len(toks) == 8 and toks == toks1 and lps == lps1
        assert all(torch.equal(x, y) for x, y in zip(logits, logits1))
        ref = reference_logits(path, list(prompt) + list(toks[:-1]))[len(prompt) - 1:]
        for row, tok in zip(ref, toks):
            assert row.max() - row[tok] <= 2e-2 * row.std(), (prompt, toks)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("decode_rows", ["gemm", "gemv"])
def test_pipelined_scheduler_equals_step_by_step_on_the_gpu(mixed_model, monkeypatch, decode_rows):
    """On the device, the scheduler's mixed steps running ahead (each step launched on the
    ids the step before chose, still on the device; read one step late) against the same
    scheduler reading every step first (``pipeline=False``): 6 requests on 4 slots, greedy
    and seeded, max_tokens 1 to 12, one asking for log-probabilities (steps read at once
    while it runs), over the contiguous cache and over a paged pool of 10 blocks of 4
    small enough to preempt (generated tokens replayed as decode rows with ``gemv``).
    Every request's tokens and log-probabilities the same to the bit, and it did run ahead."""
    from gguflm.engine.sampling import SamplingParams
    from gguflm.engine.scheduler import Job, Scheduler

    m, _ = mixed_model
    monkeypatch.setenv("GGUFLM_MATMUL", "gemm")
    monkeypatch.setattr(m, "decode_rows", decode_rows == "gemv")
    ahead_steps = []
    real = Scheduler._ahead
    monkeypatch.setattr(Scheduler, "_ahead", lambda self: ahead_steps.append(real(self)) or ahead_steps[-1])
    greedy = SamplingParams(temperature=0)
    prompts = [IDS[:4], IDS[1:6], IDS[2:6], IDS, IDS[:3], IDS[3:]]
    jobs = [Job(tuple(p), greedy if i % 2 == 0 else SamplingParams(temperature=0.9, seed=i), n, ignore_eos=True)
            for i, (p, n) in enumerate(zip(prompts, [12, 10, 1, 12, 7, 11]))]
    jobs.append(Job(tuple(IDS[:5]), greedy, 4, ignore_eos=True, top_logprobs=2))
    for paged in (False, True):
        kw = {"block_size": 4, "kv_blocks": 10} if paged else {}
        m.use_paged_cache(paged)
        try:
            runs = {pipe: _served(m, jobs, replay=paged and decode_rows == "gemv", n_slots=4, n_ctx=32,
                                  prefill_chunk=4, pipeline=pipe, **kw) for pipe in (False, True)}
        finally:
            m.use_paged_cache(False)
        (base, snap), (ahead, snap1) = runs[False], runs[True]
        assert [_result(ev)[:2] for ev in ahead] == [_result(ev)[:2] for ev in base], paged
        assert [len(_result(ev)[0]) for ev in base] == [j.max_tokens for j in jobs]
        assert snap1["generation_tokens"] == snap["generation_tokens"]
        if paged:
            assert snap["preemptions"] > 0 and snap1["preemptions"] > 0, "the pool never ran out"
    assert sum(ahead_steps) > 10, "never ran ahead: the test proves nothing"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_decode_rows_graphs_equal_eager_on_the_gpu(tiny_model, monkeypatch):
    """On the device (the CUDA rows GEMV, captured graphs) with ``GGUFLM_CUDA_DECODE_ROWS=gemv``:
    decode steps of 1, 2, 3 and 8 rows and a mixed step (3 decode rows + a 5-token prompt
    chunk) give the same logits from their graphs as eagerly, and a decode row the same
    bits at every width and beside the prompt rows."""
    from gguflm.model.cuda.batched import decode_width

    monkeypatch.setenv("GGUFLM_CUDA_DECODE_ROWS", "gemv")
    dev = torch.device("cuda")
    runs = []
    for graphs in (False, True):
        m = _load(tiny_model("Q4_K_M"), dev, use_graphs=graphs)
        assert m.row_kinds
        cache = m.new_cache(9)
        _prefill(m, cache, dev)
        got = []
        for slots in ([3], [3, 1], [1, 2, 3], [7, 6, 5, 4, 3, 2, 1, 0]):
            dw = decode_width(len(slots))
            got.append(m.batched(cache, len(slots), width=dw, decode_width=dw).step(*_rows(slots, dev))[:len(slots)]
                       .clone())
        t, p, s = _rows([2, 0, 3], dev)
        tokens = torch.cat([t, torch.tensor([1, 450, 439, 293, 110], device=dev)])
        positions = torch.cat([p, torch.arange(5, device=dev)])
        slots = torch.cat([s, torch.full((5,), 8, device=dev)])
        got.append(m.forward(tokens[:, None], positions[:, None], cache, slots,
                             select=torch.tensor([0, 1, 2, 7], device=dev), n_decode=3).clone())
        runs.append(got)
    for eager, graph in zip(*runs):
        assert torch.equal(eager, graph)
    one, two, three, eight, mixed = runs[1]
    assert torch.equal(one[0], two[0]) and torch.equal(one[0], three[2]) and torch.equal(one[0], eight[4])
    assert torch.equal(one[0], mixed[2]) and torch.equal(three[1], mixed[0]) and torch.equal(eight[6], two[1])
