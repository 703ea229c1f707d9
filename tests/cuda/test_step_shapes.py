"""The shapes of the CUDA server's batched steps under the benchmark's loads, on the CPU:
the real :class:`Scheduler` drives a stand-in of :class:`CudaModel` that records, for
every mixed step, the key of the captured graph that ``CudaModel.forward`` would replay
(:func:`gguflm.model.cuda.batched.step_shape`, the function the model itself calls), and
an LRU of ``MAX_BATCHED`` entries (the model's) counts the captures. Loads: 32 chat-sized
prompts (30-60 tokens) x 256 tokens arriving together (``benchmarks/bench_server_cuda.py``),
the same arriving one every 3 steps, and a lone request, on ``--parallel 32`` with the
scheduler's defaults (``gguflm serve --device cuda`` passes none of its own)."""

from __future__ import annotations

import random
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

from gguflm.engine.sampling import SamplingParams
from gguflm.engine.scheduler import Job, Scheduler
from gguflm.model.cuda.batched import step_shape
from gguflm.model.cuda.model import MAX_BATCHED
from gguflm.model.kv_cache import KVCache

N_VOCAB = 4


class ShapeModel:
    """Just enough of a CUDA model for the scheduler (contiguous cache, batch invariant,
    mixed steps): ``forward`` records the step's graph key and returns zero logits."""

    paged_cache = False
    batch_invariant = True

    def __init__(self, decode_rows: bool, n_ctx: int = 1024):
        self.row_kinds = decode_rows
        self.config = SimpleNamespace(n_vocab=N_VOCAB)
        self.n_ctx = n_ctx
        self.device = torch.device("cpu")
        self.keys: list[tuple] = []

    def new_cache(self, n_slots, n_ctx=None, block_size=None, n_blocks=None) -> KVCache:
        return KVCache(1, n_slots, 1, n_ctx or self.n_ctx, 1, dtype=torch.float16, device=self.device,
                       block_size=block_size, n_blocks=n_blocks)

    def flat_steps_over(self, cache: KVCache) -> bool:
        return True

    def pin_decode_width(self, cache: KVCache) -> None:
        raise AssertionError("a batch-invariant model is never pinned")

    def forward(self, tokens, positions, cache, slots, last_only=False, select=None, n_decode=None, selected=None):
        assert select is not None and tokens.shape[1] == 1, "every server step is a mixed step"
        if selected is not None:
            assert list(selected) == select.tolist()
        self.keys.append(step_shape(tokens.shape[0], n_decode or 0, select.tolist(), cache.n_slots,
                                    self.row_kinds))
        return torch.zeros(len(select), N_VOCAB)


def run_load(decode_rows: bool, n_requests: int, every: int = 0, max_tokens: int = 256,
             parallel: int = 32) -> list[tuple]:
    """The step keys of ``n_requests`` requests (one arriving each ``every`` steps; 0: all
    at once) of ``max_tokens`` tokens each on a scheduler of ``parallel`` slots."""
    model = ShapeModel(decode_rows)
    tok = SimpleNamespace(eog_ids=frozenset(), token_to_piece=lambda t, special=False: b"a")
    sched = Scheduler(SimpleNamespace(model=model, tokenizer=tok), parallel, start=False)
    rng = random.Random(0)
    jobs = [Job(tuple(rng.randrange(1, N_VOCAB) for _ in range(rng.randint(30, 60))), SamplingParams(temperature=0.0),
                max_tokens) for _ in range(n_requests)]
    done: list = []
    emit = lambda ev: done.append(ev) if type(ev).__name__ in ("Done", "Failed") else None  # noqa: E731
    step = 0
    while len(done) < n_requests:
        while jobs and (every == 0 or step % every == 0):
            sched.submit(jobs.pop(0), emit)
            if every:
                break
        sched.step()
        step += 1
        assert step < 10 * (max_tokens + 100), "the load did not finish"
    assert all(type(ev).__name__ == "Done" for ev in done)
    return model.keys


def captures(keys: list[tuple], limit: int = MAX_BATCHED) -> list[int]:
    """The steps at which an LRU of ``limit`` graphs keyed by ``keys`` captures one."""
    lru: OrderedDict = OrderedDict()
    at = []
    for i, k in enumerate(keys):
        if k not in lru:
            at.append(i)
            lru[k] = None
            while len(lru) > limit:
                lru.popitem(last=False)
        lru.move_to_end(k)
    return at


LOADS = {"burst": dict(n_requests=32), "trickle": dict(n_requests=32, every=1),
         "staggered": dict(n_requests=32, every=3), "lone": dict(n_requests=1)}
# distinct keys (graphs captured) at most, measured: burst 3 (GEMM rows) / 5 (decode rows),
# trickle and staggered 7 / 10, lone 2 / 2; before the mixed steps' buckets the decode rows
# gave 14 keys trickling or staggered, 15 captures in an LRU of 12
BOUND = {"burst": 5, "trickle": 10, "staggered": 10, "lone": 2}


@pytest.mark.parametrize("decode_rows", [False, True], ids=["gemm", "gemv"])
@pytest.mark.parametrize("load", list(LOADS))
def test_step_shapes_stay_few_and_are_captured_once(load, decode_rows, capsys):
    """Each load's steps use at most ``BOUND`` graphs, and the LRU of ``MAX_BATCHED``
    captures each once (none evicted and captured again)."""
    keys = run_load(decode_rows, **LOADS[load])
    at = captures(keys)
    with capsys.disabled():   # the figures for the notes (pytest -s)
        print(f"\n{load} {'gemv' if decode_rows else 'gemm'}: {len(keys)} steps, {len(set(keys))} keys, "
              f"{len(at)} captures at steps {at}; keys {sorted(set(keys), key=str)}")
    assert len(set(keys)) <= BOUND[load] <= MAX_BATCHED
    assert len(at) == len(set(keys))


@pytest.mark.parametrize("decode_rows", [False, True], ids=["gemm", "gemv"])
def test_step_shape_holds_the_rows(decode_rows):
    """Every (rows, decode rows, selection) gets a step that holds its rows: width >= rows,
    decode width >= decode rows (a power of two), prompt width >= prompt rows, head rows
    >= the selected prompt rows (at least 2: the GEMM) or the head over every prompt row."""
    for n_slots in (1, 9, 32):
        for n in range(1, 70):
            for n_dec in ([0] if not decode_rows else range(0, min(n, n_slots) + 1)):
                sel = [i for i in range(n) if i < n_dec or (i - n_dec) % 7 == 6 or i == n - 1]
                width, dw, hp = step_shape(n, n_dec, sel, n_slots, decode_rows)
                pw = width - dw
                assert width >= n and dw >= n_dec and pw >= n - n_dec and (dw & (dw - 1)) == 0
                assert (n_dec > 0) == (dw > 0) if decode_rows else dw == 0
                if hp is not None:
                    assert 2 <= hp < pw and hp >= sum(i >= n_dec for i in sel)


def test_prompt_length_buckets():
    """A new prompt of T tokens runs the graph of the first bucket that holds it and fits
    the slot; past the largest bucket (or the slot) it runs unpadded."""
    from gguflm.model.cuda.forward import PREFILL_BUCKETS, prefill_bucket

    assert [prefill_bucket(t, 1024) for t in (1, 16, 17, 33, 64, 65, 300, 512)] == [16, 16, 32, 64, 64, 128, 512, 512]
    assert prefill_bucket(513, 4096) is None and prefill_bucket(20, 24) is None and prefill_bucket(20, 32) == 32
    assert list(PREFILL_BUCKETS) == sorted(PREFILL_BUCKETS) and all(b % 16 == 0 for b in PREFILL_BUCKETS)
