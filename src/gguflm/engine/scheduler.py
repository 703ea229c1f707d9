"""The generation loop, with continuous batching: many generation requests share one
model, one KV cache and one worker thread. It is the only decode loop: ``generate()``,
``chat``, ``gguflm run``/``chat``, ``verify`` and ``bench`` step a scheduler of one slot on
their own thread (:class:`gguflm.engine.llm.TextStream`); the server runs N slots on a
worker thread.

Each admitted request owns a slot of a :class:`KVCache` (``n_slots`` of them). The worker
loop repeats one *step*:

1. drop cancelled requests (their slots and KV blocks are free again at once) and admit
   waiting ones into free slots, first come first served, while the KV cache's block pool
   can hold their prompts; the rest keep waiting (never dropped). The cache is paged
   (:class:`gguflm.model.kv_cache.KVCache`: blocks taken as a sequence grows, none
   reserved for a context it does not use), and whole blocks of prompt (and of generated
   text, once a request ends) stay published under a hash chain of their tokens: an
   admitted request shares the blocks of the longest run of whole blocks its prompt
   starts with (a system prompt, the earlier turns of a conversation) and computes only
   the rest (prefix caching; ``n_cached`` of :class:`Done`, ``prefix_hits`` of stats);
2. prefill: the requests still reading their prompt feed their next chunk of at most
   ``prefill_chunk`` tokens (chunks follow each other from where the cached prefix ends,
   whoever else is running), as many requests as fit in ``prefill_budget`` padded
   tokens, together in ONE forward (rows right-padded); a request whose prompt is
   complete samples its first token from its last chunk's logits;
3. decode: every request that has a sampled token not yet in the cache feeds it, all of
   them together in ONE batched forward (``tokens [B, 1]`` at their own positions in
   their own slots; or in forwards of ``max_batch_rows``); each row is sampled with its
   request's own parameters, history and random generator, on the device that holds the
   logits, and the step's chosen ids are read back at once (the only copy to the host;
   one step later where the scheduler runs ahead, below),
   so a request's tokens do not depend on who else is in the batch (up to float rounding
   of a batched matmul).

Preemption (vLLM's recompute mode): when a running request needs a new KV block and the
pool has none (no free block, no cached one to evict), the most recently admitted running
request is *preempted*: its blocks go back to the pool (whole blocks published first, so
prefix caching may keep them), its slot is freed, and it waits at the front of the queue
with everything it had: prompt and generated tokens, sampler state (random generator,
penalty history), text held back, logprobs not yet sent. Admitted again, it prefills
its prompt and generated tokens (its last sampled token included: that prefill's last
logits choose its next token, as the decode step would have) and goes on; preempted
requests come back first, oldest admission first. The oldest running request is never
preempted for a younger one, so it always advances. A request that does not fit the pool
even alone is refused at :meth:`Scheduler.check` (:class:`KVPoolError`: its prompt plus
``max_tokens``); one without ``max_tokens`` that fills the whole pool alone ends with
"length", as at a full context.

On the CPU (a paged cache and the C++ block step: ``Model.flat_steps``) steps 2 and 3
are ONE forward (:meth:`Scheduler._mixed_step`): a row per token, the decode rows and
the prompt chunks side by side up to ``prefill_budget`` tokens, nothing padded, so the
step is as wide as what is live and a prompt never waits for the decodes (chunked
prefill mixed with decode). On CUDA the same (unless ``GGUFLM_CUDA_MIXED=0``) over
batch-invariant kernels (the batched step, captured per power-of-two width).

On an asynchronous device (CUDA) the scheduler *runs ahead* (``pipeline``; the
default for one slot — ``generate()``, ``run``, ``bench`` — and for mixed steps): the ids a
step chooses stay on the device and are fed to the next step, which is launched before
the host reads them (copied into pinned memory behind an event, read one step late).
Accepting them (detokenization, stop strings, emitting, the HTTP streams, block
bookkeeping, building the next step's inputs) then overlaps the next step on the device.
A step's decode rows take their tokens from the device (gathered from the ids of the
step in flight) or from the host (a token read already; a preempted request's generated
tokens fed again), its prompt chunks from the host; positions are known on the host
(a running request advances by one a step). One slot decodes through the model's
one-sequence step (:meth:`Model.decode_one`: the decode graph), several through the
mixed step. The host sees an end (end of generation, stop string) one step late: the
row launched for that request is discarded, and the key/value it wrote lies past the
positions the request holds (never read; with a paged cache in a block the request held
at launch, given back only later, after that write in the stream's order). Where the end
does not depend on the token (max_tokens, a full context) no row is launched. Whatever
needs the host's view of a step before the next is built *drains* instead: the step in
flight is read first and the step is read at once (unpipelined), while a request that
keeps logits, asks for log-probabilities or uses penalties (which need its history) is
running, and when the block pool cannot hold the step's positions (preemption takes a
request with everything the host knows of it). A request cancelled meanwhile is dropped
with its id unread. The tokens are those of the scheduler that reads every step first
(each request's sampling chain draws in the same order).

For a model that is not ``batch_invariant`` (CUDA: one row and many rows, a prompt alone
and padded beside others, run different kernels), the scheduler keeps what a request
computes independent of the others: every one-token step runs the same kernels whoever
shares it (``Model.pin_decode_width``: on CUDA the batched step for one row too, at the
width of the live rows when its rows do not depend on the width — the fused GEMM — else
at the width of all slots), each forward reads the prompt of one request, and no
keys/values are reused from another computation (no prompt cache). A request's output is
then the same alone or among others.

Requests join and leave between steps. Results go out through each request's ``emit``
callback, called on the worker thread, as :class:`Piece`, then one :class:`Done` or
:class:`Failed`. Text is assembled per request with the engine's :class:`TextAssembler`
(whole UTF-8 characters only; stop strings cut and never emitted).
"""

from __future__ import annotations

import collections
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import torch

from gguflm.engine.generate import ContextLengthError, GenerationError, TextAssembler, check_request
from gguflm.engine.metrics import Metrics
from gguflm.engine.sampling import SamplingError, SamplingParams, choose, new_generator
from gguflm.model.kv_cache import DEFAULT_BLOCK_SIZE, KVCache, host_to_device

if TYPE_CHECKING:
    from gguflm.engine.llm import LLM


@dataclass(frozen=True)
class Job:
    """What to generate. ``max_tokens=None``: until end of generation or a full context.
    ``top_logprobs=None``: no log-probabilities; ``k >= 0``: the sampled token's
    log-probability and the ``k`` most likely alternatives at each step. ``ignore_eos``:
    end-of-generation tokens are never sampled (their logits count as -inf, as in
    llama.cpp's server); the request runs to ``max_tokens`` or a full context.
    ``keep_logits``: :class:`Done` carries each step's raw logits (float32, on the CPU:
    a whole row crosses to the host each step, for verification only)."""

    prompt: tuple[int, ...]
    params: SamplingParams = SamplingParams()
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    ignore_eos: bool = False
    keep_logits: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: ``logprob = log_softmax(logits)[id]`` of the model's raw
    logits (before penalties and filters), and the ``top`` alternatives ``(id, logprob)``,
    most likely first."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Piece:
    """New text, and the tokens generated since the previous piece (when logprobs were
    asked for; the text of a token may be held back until a later piece)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Done:
    """The request finished: ``finish_reason`` "stop" (end-of-generation token or stop
    string) or "length" (max_tokens or a full context). ``tokens``: the generated ids (an
    end-of-generation token not included); ``prefill_seconds``: admission to the first
    token; ``decode_seconds``: the first token to the last; ``logits``: see Job.keep_logits
    (row i chose token i)."""

    finish_reason: str
    n_prompt: int
    n_completion: int
    n_cached: int = 0   # prompt tokens whose keys/values were reused, not computed
    tokens: tuple[int, ...] = ()
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    logits: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class Failed:
    """The request could not be completed (model error, shutdown)."""

    message: str


Event = Union[Piece, Done, Failed]
Emit = Callable[[Event], None]


class QueueFullError(GenerationError):
    """Too many requests are already waiting."""


class KVPoolError(ContextLengthError):
    """The request does not fit the KV cache's block pool even alone (``positions``: what
    the pool holds; ``needed``: what the request needs)."""

    def __init__(self, message: str, positions: int, needed: int):
        super().__init__(message)
        self.positions, self.needed = positions, needed


class Ticket:
    """A submitted job; ``cancel()`` (any thread) stops it and frees its slot at the next step."""

    def __init__(self, job: Job, emit: Emit, scheduler: Scheduler):
        self.job, self.emit, self._scheduler = job, emit, scheduler
        self.cancelled = False
        self.t_submit = time.perf_counter()

    def cancel(self) -> None:
        self._scheduler.cancel(self)


@dataclass(eq=False)
class _Seq:
    """A running request: the slot it owns and where it stands (compared and hashed by identity)."""

    ticket: Ticket
    slot: int
    todo: list[int]                 # prompt tokens not yet in the cache
    history: list[int]              # prompt + generated tokens (the penalties' window)
    generator: torch.Generator
    text: TextAssembler
    n_past: int = 0                 # positions of the slot filled
    last: int | None = None         # sampled token waiting to be fed
    n_gen: int = 0
    n_cached: int = 0               # prompt tokens reused from the prompt cache
    replay: list[int] = field(default_factory=list)  # generated tokens to feed again after ``last`` (row kinds)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet emitted
    kept: list[torch.Tensor] = field(default_factory=list)      # Job.keep_logits rows
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float | None = None    # when the first token was chosen
    t_last: float | None = None     # when the last token was chosen

    def done(self, reason: str) -> Done:
        n_prompt, now = len(self.ticket.job.prompt), time.perf_counter()
        first = self.t_first if self.t_first is not None else now
        return Done(reason, n_prompt, self.n_gen, self.n_cached, tuple(self.history[n_prompt:]),
                    first - self.t_start, now - first, tuple(self.kept))


class _Flight:
    """One launched forward's chosen ids (Long, on the device): ``seqs[i]`` (row order)
    chose ``ids[at[i]]`` from ``logits[i]`` (kept only when read at once). Running ahead
    (``ahead``), the ids are copied to pinned host memory behind an event at once and read
    one step later."""

    def __init__(self, seqs: list[_Seq], logits: torch.Tensor | None, order: list[int], ids: torch.Tensor,
                 ahead: bool):
        self.seqs, self.logits, self.ids = seqs, logits, ids
        self.at = [0] * len(seqs)
        for k, row in enumerate(order):
            self.at[row] = k
        self.host: torch.Tensor | None = None
        self.ready = None
        if ahead:
            self.host = ids.to("cpu", non_blocking=True)
            if ids.is_cuda:
                self.ready = torch.cuda.Event()
                self.ready.record()

    def read(self) -> list[int]:
        """The ids in row order (the step's one copy to the host, or the wait for it)."""
        if self.host is None:
            ids = _read(self.ids)
        else:
            if self.ready is not None:
                self.ready.synchronize()   # releases the GIL while the step that chose them finishes
            ids = self.host.tolist()
        return [ids[k] for k in self.at]


class Scheduler:
    """The worker loop (see the module docstring) over a cache of ``n_slots`` slots of
    ``n_ctx`` positions (default: the model's context). ``max_batch_rows`` caps the rows of
    one decode forward (None: all running requests in one); a larger batch runs as several
    forwards, for kernels whose cost per row jumps past some width. ``pipeline`` (default: on
    a CUDA device, for one slot or mixed steps): run ahead (see the module docstring). The loop runs on a
    thread of its own, or, with ``start=False``, on whichever thread calls :meth:`run`
    (the one that loaded the model: on the CPU, a second thread running the kernels
    brings a second OpenMP team, and with more threads than cores both stop spinning and
    every parallel region pays a wake-up: a decode step takes twice as long)."""

    def __init__(self, llm: LLM, n_slots: int, n_ctx: int | None = None, *,
                 prefill_chunk: int = 256, prefill_budget: int = 512, max_waiting: int = 1024,
                 max_batch_rows: int | None = None, start: bool = True, pipeline: bool | None = None,
                 block_size: int | None = DEFAULT_BLOCK_SIZE, kv_blocks: int | None = None):
        if n_slots < 1:
            raise ValueError("n_slots must be >= 1")
        if prefill_chunk < 1 or prefill_budget < 1 or max_waiting < 0:
            raise ValueError("prefill_chunk and prefill_budget must be >= 1, max_waiting >= 0")
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        self.max_batch_rows = max_batch_rows
        self.llm, self.model = llm, llm.model
        model = llm.model
        if model.paged_cache and block_size is not None:
            self.cache: KVCache = model.new_cache(n_slots, n_ctx, block_size=block_size, n_blocks=kv_blocks)
        else:
            self.cache = model.new_cache(n_slots, n_ctx)
        self.prefill_chunk, self.prefill_budget = prefill_chunk, prefill_budget
        self.max_waiting = max_waiting
        # rows independent of their company (the CPU's exact kernels) or made so: fixed step
        # shapes, one prompt per forward, no prompt cache (see the module docstring)
        self._shared_steps = model.batch_invariant or n_slots == 1
        self._prompt_cache = model.batch_invariant and self.cache.paged  # reused keys/values equal computed ones
        self._row_kinds = model.row_kinds   # decode rows computed unlike prompt rows
        if not self._shared_steps:
            model.pin_decode_width(self.cache)
        self._eog = frozenset(llm.tokenizer.eog_ids)
        self._piece = llm.tokenizer.token_to_piece
        self._pieces: dict[int, bytes] = {}   # token -> its bytes, as met
        self._eog_index = sorted(self._eog)
        device = self.cache.k.device
        self._eog_dev = torch.tensor(self._eog_index, device=device) if self._eog_index else None
        flat = model.flat_steps_over(self.cache) and self._shared_steps
        if pipeline is None:   # GGUFLM_PIPELINE=0: several slots step one at a time (for measuring)
            pipeline = device.type == "cuda" and (n_slots == 1 or (flat and os.environ.get("GGUFLM_PIPELINE") != "0"))
        if pipeline and n_slots > 1 and not flat:
            raise ValueError("running ahead over several slots needs mixed steps (a batch-invariant model)")
        self._pipeline = pipeline
        # a device that runs a launched step on its own (CUDA): a step's events go out once
        # the next step is launched, so that the event loop's work on them (the HTTP
        # streams) never delays a launch; elsewhere (the CPU computes in the launch) at once
        self.events_after_launch = device.type == "cuda"
        # prompt chunks ride in the decode step's forward as one-token rows (see _mixed_step);
        # one slot that runs ahead decodes through the model's one-sequence step (decode_one)
        self._mixed = flat and not (pipeline and n_slots == 1)
        self._flight: list[_Flight] = []   # the step launched and not yet read (running ahead)
        # a preempted request's generated tokens fed again as decode rows (see _Seq.replay)
        self._kind_replay = self._row_kinds and self._mixed
        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._preempted: collections.deque[_Seq] = collections.deque()  # admitted before _waiting
        self._free = list(range(n_slots))
        self.metrics = Metrics()
        # a step's events and token latencies, sent once it ends (_deliver: the metrics first)
        self._outbox: list[tuple[Ticket, Event]] = []
        self._ttfts: list[float] = []
        self._itls: list[float] = []
        self._generated = 0
        self._active: list[_Seq] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="gguflm-scheduler", daemon=True)
            self._thread.start()

    # ---- any thread -------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        return self.cache.n_slots

    @property
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    def stats(self) -> dict[str, int]:
        """Slots busy and idle, requests waiting."""
        with self._cond:
            busy = self.n_slots - len(self._free)
            return {"slots_total": self.n_slots, "slots_processing": busy,
                    "slots_idle": self.n_slots - busy,
                    "requests_waiting": len(self._waiting) + len(self._preempted)}

    def kv_stats(self) -> dict[str, int]:
        """The KV cache's blocks (see :meth:`KVCache.stats`) and running sequences."""
        with self._cond:
            return {**self.cache.stats(), "running": len(self._active)}

    def check(self, job: Job) -> None:
        """Raise :class:`GenerationError` (or its :class:`ContextLengthError`) if ``job``
        cannot run: empty prompt, prompt that fills the context, ids outside the vocabulary,
        negative max_tokens."""
        n_vocab = self.model.config.n_vocab
        check_request(job.prompt, self.n_ctx, n_vocab, job.max_tokens)
        if job.top_logprobs is not None and not 0 <= job.top_logprobs <= n_vocab:
            raise GenerationError(f"top_logprobs must lie in [0, {n_vocab}]")
        cache = self.cache
        pool = cache.n_blocks * cache.block_size
        # positions written: the prompt, then every generated token but the last (at least one)
        needed = len(job.prompt) + max((job.max_tokens or 0) - 1, 1)
        if cache.paged and min(needed, self.n_ctx) > pool:
            what = f"prompt of {len(job.prompt)} tokens" + (
                f" plus max_tokens={job.max_tokens}" if job.max_tokens is not None else "")
            raise KVPoolError(f"the {what} needs {min(needed, self.n_ctx)} positions of the KV cache, but its "
                              f"whole pool holds {pool} ({cache.n_blocks} blocks of {cache.block_size}); "
                              "lower max_tokens or shorten the prompt, or start the server with a larger "
                              "--kv-size", pool, min(needed, self.n_ctx))

    def submit(self, job: Job, emit: Emit) -> Ticket:
        """Queue ``job`` (checked first); ``emit`` receives its events on the worker thread."""
        self.check(job)
        ticket = Ticket(job, emit, self)
        with self._cond:
            if self._stopping:
                raise GenerationError("the scheduler is shut down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting; try again later")
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop ``ticket``'s request; it gets no further events. No-op once finished."""
        with self._cond:
            ticket.cancelled = True
            self._cond.notify()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; running and waiting requests receive :class:`Failed`. Waits up to
        ``timeout`` for the loop's own thread (``start=True``); a :meth:`run` returns."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def step(self) -> None:
        """One step of the loop on the calling thread (``start=False``): admit, prefill,
        decode. A model failure raises here (the loop of :meth:`run` fails the requests
        instead)."""
        try:
            with self._cond:
                self._reap_and_admit()
            self._step()
        finally:
            self._deliver()

    def run(self) -> None:
        """Run the loop on the calling thread until :meth:`close` (``start=False`` only)."""
        if self._thread is not None:
            raise RuntimeError("this scheduler's loop already runs on its own thread")
        self._loop()

    # ---- worker thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active or self._preempted):
                    self._cond.wait()
                if self._stopping:
                    break
                self._reap_and_admit()
            try:
                self._step()
            except Exception as e:  # a model failure must not kill the server: fail who was running
                traceback.print_exc()
                self._flight = []
                for seq in list(self._active):
                    self._finish(seq, Failed(f"generation failed: {type(e).__name__}: {e}"))
            if not (self.events_after_launch and self._active and (self._mixed or self._pipeline)):
                self._deliver()   # (else after the next step's launch: _mixed_step)
        with self._cond:
            left = [s.ticket for s in self._active + list(self._preempted)] + list(self._waiting)
            self._active.clear()
            self._preempted.clear()
            self._waiting.clear()
        for ticket in left:
            self._send(ticket, Failed("the server is shutting down"))
        self._deliver()

    def _reap_and_admit(self) -> None:
        """(Lock held.) Free the slots of cancelled requests; move waiting ones into free
        slots while the block pool holds their prompts."""
        for seq in [s for s in self._active if s.ticket.cancelled]:
            self._active.remove(seq)
            self._free_slot(seq)
        self._waiting = collections.deque(t for t in self._waiting if not t.cancelled)
        self._preempted = collections.deque(s for s in self._preempted if not s.ticket.cancelled)
        while self._preempted and self._free:  # first: they were admitted before anyone waiting
            seq = self._preempted[0]
            slot = self._free[-1]
            n_prompt = len(seq.ticket.job.prompt)
            n_cached = self._start_slot(slot, seq.history, limit=n_prompt if self._kind_replay else None)
            if n_cached is None:
                if self._active:
                    return     # first come first served: nobody overtakes a preempted request
                self._preempted.popleft()  # alone it cannot hold what it has: its context is full
                self._finish(seq, self._full(seq), locked=True)
                continue
            self._preempted.popleft()
            self._free.pop()
            seq.slot, seq.n_past, seq.todo, seq.last = slot, n_cached, seq.history[n_cached:], None
            if self._kind_replay:  # its generated tokens again as decode rows, one per step
                seq.todo, seq.replay = seq.history[n_cached:n_prompt], seq.history[max(n_cached, n_prompt):]
                if not seq.todo:
                    seq.last = seq.replay.pop(0)
            self._active.append(seq)
        while self._waiting and self._free:
            ticket = self._waiting[0]
            job = ticket.job
            slot = self._free[-1]
            n_cached = self._start_slot(slot, job.prompt)
            if n_cached is None:  # the pool is full: wait for running requests to end
                if self._active:
                    break
                self._waiting.popleft()  # nobody will free blocks: the prompt can never fit
                self._send(ticket, Failed(f"the prompt needs more KV cache blocks than the pool has "
                                          f"({self.cache.n_blocks} of {self.cache.block_size} positions)"))
                continue
            self._waiting.popleft()
            self._free.pop()
            gen = new_generator(job.params.seed, self.cache.k.device)
            seq = _Seq(ticket, slot, list(job.prompt[n_cached:]), list(job.prompt), gen, TextAssembler(job.stop),
                       n_past=n_cached, n_cached=n_cached)
            self.metrics.admitted(len(job.prompt), n_cached, time.perf_counter() - ticket.t_submit)
            self._active.append(seq)
            if job.max_tokens == 0:
                self._finish(seq, seq.done("length"), locked=True)

    def _start_slot(self, slot: int, prompt: Sequence[int], limit: int | None = None) -> int | None:
        """(Lock held.) Give the free ``slot`` the blocks of ``prompt``: the published blocks
        of its longest whole-block prefix (prefix caching), fresh ones for the rest. Returns
        how many prompt tokens are cached (at least the last one is left to compute: its
        logits give the first token; at most ``limit``), or None when the pool cannot hold
        the prompt."""
        cache = self.cache
        blocks = cache.lookup(prompt) if self._prompt_cache else []
        while blocks and (len(blocks) * cache.block_size >= len(prompt)
                          or (limit is not None and len(blocks) * cache.block_size > limit)):
            blocks.pop()
        cache.share(slot, blocks)
        if not cache.reserve(slot, len(prompt)):
            cache.release(slot)
            return None
        return len(blocks) * cache.block_size

    def _free_slot(self, seq: _Seq) -> None:
        """(Lock held.) ``seq`` left its slot: publish the whole blocks of what it computed
        (prompt and generated tokens) and give its blocks back."""
        if self._prompt_cache:
            self.cache.publish(seq.slot, seq.history[:self._computed(seq)])
        self.cache.release(seq.slot)
        self._free.append(seq.slot)

    def _computed(self, seq: _Seq) -> int:
        """The positions of ``seq`` whose keys/values a prompt would reuse: all of them, or
        where the model computes decode rows differently from prompt rows
        (``Model.row_kinds``) those of its prompt (a later request reading them as its
        prompt computes prompt rows; generated tokens are decode rows, also when a
        preempted request feeds them again: ``_Seq.replay``)."""
        return min(seq.n_past, len(seq.ticket.job.prompt)) if self._row_kinds else seq.n_past

    def _step(self) -> None:
        if not self._mixed:
            self._prefill()
            if not self._pipeline:
                self._decode()
                return
        self._mixed_step()

    def _mixed_step(self) -> None:
        """Chunked prefill mixed with decode in ONE forward of one-token rows: every request
        with a sampled token feeds it (at most ``max_batch_rows`` of them per forward; the
        rest in further forwards), and the prompt chunks of reading requests (first come
        first served, each at most ``prefill_chunk`` tokens) fill the step up to
        ``prefill_budget`` tokens (always at least 16). A row per token, none padded: the
        step's width is what is live. Logits are computed only for the decode rows and the
        last token of each prompt that completes.

        Running ahead (:meth:`_ahead`), the step is launched before the step in flight is
        read: the requests that step chose for feed its ids from the device, then those ids
        are read and accepted (:meth:`_land`) while this one runs. Otherwise the step in
        flight is read first (drained) and this one is read at once. Without mixed steps
        (one slot that runs ahead) it is the decode half of the step, through the model's
        one-sequence step."""
        ahead = self._ahead()
        if not ahead:
            self._land(self._flight)       # drain: the requests' host view, before any preemption
            self._flight = []
        where = self._where()
        ready = self._grow([(s, s.n_past + 1) for s in self._feeding(where)])   # reserved already when ahead
        width = self.max_batch_rows or max(len(ready), 1)
        groups = [ready[i:i + width] for i in range(0, len(ready), width)] or [[]]
        left = max(self.prefill_budget - len(groups[0]), 16) if self._mixed else 0
        chunks: list[tuple[_Seq, list[int]]] = []
        for s in self._active:
            if s.todo and left > 0 and not s.ticket.cancelled:
                chunk = s.todo[:min(self.prefill_chunk, left)]
                chunks.append((s, chunk))
                left -= len(chunk)
        feed = torch.cat([f.ids for f in self._flight]).clamp(min=0) if where else None  # an id of -1 fails when read
        flights = []
        for i, group in enumerate(groups):
            flight = self._launch(group, chunks if i == 0 else [], feed, where, ahead)
            if i == 0 and self.events_after_launch:
                self._deliver()   # the events of the step before, now that the device has this one
            if flight is not None and ahead:
                flights.append(flight)
            elif flight is not None:
                self._land([flight])
        if ahead:
            previous, self._flight = self._flight, flights
            self._land(previous, relaunched={s for s in ready if s in where})

    def _ahead(self) -> bool:
        """Whether this step runs ahead: ``pipeline`` on, every running request can
        (:meth:`_runs_ahead`: none needs the host's view of a step before the next), and
        the pool holds the positions of the step's decode rows (reserved here; where it
        does not, the step in flight is read first, so that preemption sees every request
        as the host knows it). A cancelled request is dropped with its id unread."""
        if not self._pipeline or not all(self._runs_ahead(s) for s in self._active if not s.ticket.cancelled):
            return False
        return all(self.cache.reserve(s.slot, s.n_past + 1) for s in self._feeding(self._where()))

    def _where(self) -> dict[_Seq, int]:
        """The requests whose next token the step in flight chose -> the index of its id in
        the flight's ids (concatenated over its forwards)."""
        where, offset = {}, 0
        for f in self._flight:
            for s, k in zip(f.seqs, f.at):
                where[s] = offset + k
            offset += len(f.seqs)
        return where

    def _feeding(self, where: dict[_Seq, int]) -> list[_Seq]:
        """The running requests that feed a token this step (in admission order): a sampled
        token the host holds, or one the step in flight chose, unless that token is known
        to end the request (max_tokens, a full context): no row is launched for it."""
        out, n_ctx = [], self.n_ctx
        for s in self._active:
            job = s.ticket.job
            goes_on = s in where and (job.max_tokens is None or s.n_gen + 1 < job.max_tokens) and s.n_past < n_ctx
            if not s.ticket.cancelled and (s.last is not None or goes_on):
                out.append(s)
        return out

    def _launch(self, decode: list[_Seq], chunks: list[tuple[_Seq, list[int]]], feed: torch.Tensor | None,
                where: dict[_Seq, int], ahead: bool) -> _Flight | None:
        """Launch one forward: the decode rows ``decode`` (each feeds its sampled token:
        ``last`` from the host, or the id the step in flight chose, ``feed[where[s]]`` on the
        device), then the prompt ``chunks``; choose the next tokens on the device. Nothing
        is read here. The host's view moves on by what it knows: prompt chunks and decode
        rows it fed are counted now, a row fed from the device when its id is read.
        Returns the ids it chose (None if no row chooses)."""
        if not decode and not chunks:
            return None
        n = len(decode) + sum(len(c) for _, c in chunks)
        tokens = [0 if s.last is None else s.last for s in decode]
        gather = [i if s.last is not None else n + where[s] for i, s in enumerate(decode)] + list(range(len(decode), n))
        positions = [s.n_past for s in decode]
        slots = [s.slot for s in decode]
        select = [i for i, s in enumerate(decode) if not s.replay]   # replayed tokens (not the last) choose nothing
        seqs = [s for s in decode if not s.replay]
        for s, chunk in chunks:
            tokens += chunk
            positions += range(s.n_past, s.n_past + len(chunk))
            slots += [s.slot] * len(chunk)
            if len(chunk) == len(s.todo) and not s.replay:  # the prompt is read after this chunk: its last logits
                select.append(len(tokens) - 1)
                seqs.append(s)
        fed = feed is not None and any(s.last is None for s in decode)
        inputs = host_to_device(tokens + positions + slots + select + (gather if fed else []), self.cache.k.device)
        tok, pos, slot = inputs[:n], inputs[n:2 * n], inputs[2 * n:3 * n]                    # [N] each: one copy
        if fed:
            tok = torch.cat([tok, feed]).index_select(0, inputs[3 * n + len(select):])
        if not self._mixed:   # one slot running ahead, no prompt rows: the model's one-sequence step
            logits = self.model.decode_one(tok, pos, self.cache, decode[0].slot)                # [1, V]
        else:
            kinds = {"n_decode": len(decode), "selected": select} if self._row_kinds else {}  # decode rows lead
            logits = self.model.forward(tok[:, None], pos[:, None], self.cache, slot,
                                        select=inputs[3 * n:3 * n + len(select)], **kinds)    # [len(select), V]
        flight = None
        if seqs:   # the logits are kept only for a step read at once (running ahead, nobody needs them)
            flight = _Flight(seqs, None if ahead else logits, *self._pick(seqs, logits, range(len(seqs))), ahead)
        for s in decode:
            if s.last is not None:
                s.n_past += 1
                s.last = s.replay.pop(0) if s.replay else None   # a preempted request's generated tokens, in turn
        for s, chunk in chunks:
            s.n_past += len(chunk)
            del s.todo[:len(chunk)]
            if self._prompt_cache:  # whole blocks of prompt: shareable at once
                self.cache.publish(s.slot, s.history[:s.n_past])
            if not s.todo and s.replay:       # a preempted request's generated tokens come next
                s.last = s.replay.pop(0)
        return flight

    def _land(self, flights: list[_Flight], relaunched: set[_Seq] = frozenset()) -> None:
        """Read the ids ``flights`` chose and accept each (in row order); a request in
        ``relaunched`` was fed its id by the step just launched: if it goes on, that
        position is counted now, else (an end seen one step late) the step's row for it is
        discarded (the key/value it wrote lies past the request's positions, never read).
        Requests gone since (cancelled) are skipped."""
        for f in flights:
            for i, (s, tok) in enumerate(zip(f.seqs, f.read())):
                if s not in self._active:
                    continue
                self._accept_or_fail(s, None if f.logits is None else f.logits[i], tok)
                if s in relaunched and s.last is not None:
                    s.n_past += 1
                    s.last = None

    def _prefill(self) -> None:
        """One batched forward over the next prompt chunk of as many reading requests (first
        come first served) as fit in ``prefill_budget`` padded tokens (always at least one);
        rows are right-padded to the longest chunk."""
        reading = [s for s in self._active if s.todo and not s.ticket.cancelled]
        group: list[_Seq] = []
        T = 0
        for seq in reading:
            t = max(T, min(len(seq.todo), self.prefill_chunk))
            if group and ((len(group) + 1) * t > self.prefill_budget or not self._shared_steps):
                break
            group.append(seq)
            T = t
        if not group:
            return
        device = self.cache.k.device
        chunks = [seq.todo[:self.prefill_chunk] for seq in group]
        tokens = torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=device)          # [B, T]
        positions = torch.tensor([list(range(s.n_past, s.n_past + len(c))) + [-1] * (T - len(c))
                                  for s, c in zip(group, chunks)], device=device)                # [B, T]
        slots = torch.tensor([s.slot for s in group], device=device)                           # [B]
        logits = self.model.forward(tokens, positions, self.cache, slots, last_only=True)      # [B, V]
        finishing = [i for i, s in enumerate(group) if len(s.todo) <= self.prefill_chunk]  # prompt read after this chunk
        chosen = self._choose([group[i] for i in finishing], logits, finishing)
        for i, (seq, chunk) in enumerate(zip(group, chunks)):
            seq.n_past += len(chunk)
            del seq.todo[:len(chunk)]
            if self._prompt_cache:  # whole blocks of prompt: shareable at once
                self.cache.publish(seq.slot, seq.history[:seq.n_past])
            if not seq.todo:
                self._accept_or_fail(seq, logits[i], chosen[i])

    def _decode(self) -> None:
        """Feed every request's last sampled token at its own position: one batched forward,
        or several of at most ``max_batch_rows`` rows."""
        ready = self._grow([(s, s.n_past + 1) for s in self._active if not s.ticket.cancelled and s.last is not None])
        width = self.max_batch_rows or max(len(ready), 1)
        for i in range(0, len(ready), width):
            self._decode_rows(ready[i:i + width])

    def _decode_rows(self, rows: list[_Seq]) -> None:
        inputs = torch.tensor([[s.last for s in rows], [s.n_past for s in rows], [s.slot for s in rows]],
                              device=self.cache.k.device)                              # [3, B]: one copy
        tokens, positions, slots = inputs[0, :, None], inputs[1, :, None], inputs[2]   # [B, 1], [B, 1], [B]
        logits = self.model.forward(tokens, positions, self.cache, slots, last_only=True)  # [B, V]
        chosen = self._choose(rows, logits, range(len(rows)))
        for i, seq in enumerate(rows):
            seq.n_past += 1
            seq.last = None
            self._accept_or_fail(seq, logits[i], chosen[i])

    def _grow(self, wants: list[tuple[_Seq, int]]) -> list[_Seq]:
        """Give each request of ``wants`` (in admission order) blocks for its positions
        ``0 .. n-1``; when the pool has none left, preempt the most recently admitted
        running request (:meth:`_preempt`) until it has, or until the request is the last
        one standing: alone it cannot grow (the pool is its context) and ends with "length".
        Returns the requests that got their blocks (none of them preempted)."""
        ready = []
        for s, n in wants:
            while s in self._active and not self.cache.reserve(s.slot, n):
                gone = [v for v in self._active if v.ticket.cancelled]
                if gone:                       # cancelled since the step began: their blocks first
                    with self._cond:
                        for v in gone:
                            self._release(v)
                elif len(self._active) == 1:   # s alone
                    self._finish(s, self._full(s))
                else:
                    self._preempt(self._active[-1])
            if s in self._active:
                ready.append(s)
        return ready

    def _preempt(self, seq: _Seq) -> None:
        """Take ``seq``'s slot and blocks back and queue it first (see the module docstring)."""
        assert not self._flight, "a step in flight is read before anyone is preempted"
        with self._cond:
            self._release(seq)
            self._preempted.appendleft(seq)
        self.metrics.preempted()

    def _full(self, seq: _Seq) -> Done:
        """``seq`` filled the whole block pool alone (its context): it ends with "length"."""
        self._emit_piece(seq, seq.text.flush())
        return seq.done("length")

    def _runs_ahead(self, seq: _Seq) -> bool:
        """Whether ``seq`` lets the steps run ahead: nothing of it needs the host's view of a
        step before the next (its logits kept, log-probabilities, penalties over its history)."""
        job = seq.ticket.job
        return (self._pipeline and not job.keep_logits and job.top_logprobs is None
                and not job.params.penalties_enabled)

    def _accept_or_fail(self, seq: _Seq, logits: torch.Tensor, tok: int) -> None:
        """:meth:`_accept`; a failure there (sampling, detokenizing, stop strings) is this
        request's alone: it ends with :class:`Failed`, the others go on."""
        try:
            self._accept(seq, logits, tok)
        except Exception as e:  # noqa: BLE001 - isolate one request's failure
            traceback.print_exc()
            self._finish(seq, Failed(f"generation failed: {type(e).__name__}: {e}"))

    def _accept(self, seq: _Seq, logits: torch.Tensor | None, tok: int) -> None:
        """``tok``, chosen from ``logits`` (Float32[V]; None for a request that runs ahead) by
        :meth:`_choose`, is the next token of ``seq``: end it (end of generation, stop
        string, max_tokens, full context) or emit its text and feed it at the next step."""
        job = seq.ticket.job
        if tok < 0:
            raise SamplingError("cannot sample: the logits are not finite")
        now = time.perf_counter()
        if seq.t_last is None:
            seq.t_first = now
            self._ttfts.append(now - seq.ticket.t_submit)
        else:
            self._itls.append(now - seq.t_last)
        seq.t_last = now
        if job.keep_logits:
            seq.kept.append(logits.float().cpu())
        if tok in self._eog:
            self._finish(seq, seq.done("stop"))
            return
        self._generated += 1
        seq.history.append(tok)
        seq.n_gen += 1
        if job.top_logprobs is not None:
            seq.logprobs.append(_logprob(logits, tok, job.top_logprobs))
        piece = self._pieces.get(tok)
        if piece is None:
            piece = self._pieces[tok] = self._piece(tok)
        text, stopped = seq.text.push(piece)
        if stopped:
            self._emit_piece(seq, text)
            self._finish(seq, seq.done("stop"))
        elif seq.n_gen == job.max_tokens or seq.n_past >= self.n_ctx:
            self._emit_piece(seq, text + seq.text.flush())
            self._finish(seq, seq.done("length"))
        else:
            if text:
                self._emit_piece(seq, text)
            seq.last = tok

    def _allowed(self, logits: torch.Tensor, job: Job) -> torch.Tensor:
        """``logits`` [..., V], with the end-of-generation tokens at -inf when ``job`` ignores them."""
        if not job.ignore_eos or self._eog_dev is None:
            return logits
        return logits.float().index_fill(-1, self._eog_dev, float("-inf"))

    def _choose(self, seqs: Sequence[_Seq], logits: torch.Tensor, rows: Sequence[int]) -> dict[int, int]:
        """{row: token} for the rows of ``logits`` [B, V] (``rows[i]`` is ``seqs[i]``'s): each
        request's sampling chain on the logits' device, then ONE read of all the chosen ids
        (the only copy to the host of a step). Greedy rows without penalties take one
        argmax together (over the allowed tokens; the first index on ties)."""
        if not seqs:
            return {}
        order, ids = self._pick(seqs, logits, rows)
        return dict(zip(order, _read(ids)))

    def _pick(self, seqs: Sequence[_Seq], logits: torch.Tensor,
              rows: Sequence[int]) -> tuple[list[int], torch.Tensor]:
        """:meth:`_choose` without the read: the rows in the order of the ids, and the ids
        (Long[len(rows)], on the logits' device)."""
        device = logits.device
        jobs = [s.ticket.job for s in seqs]
        argmax = [job.params.greedy and not job.params.penalties_enabled for job in jobs]
        plain = [(r, job) for r, job, a in zip(rows, jobs, argmax) if a]
        picked: list[torch.Tensor] = []
        if plain:
            index = [r for r, _ in plain]                    # increasing
            masked = [i for i, (_, job) in enumerate(plain) if job.ignore_eos] if self._eog_index else []
            sel = logits if len(index) == logits.shape[0] else logits.index_select(0, host_to_device(index, device))
            if masked:  # few operations: each is a round trip through the GIL in a busy server
                eog = self._eog_dev
                if len(masked) == len(index):
                    sel = sel.index_fill(1, eog, float("-inf"))
                else:
                    sel = sel.clone()
                    sel[host_to_device(masked, device)[:, None], eog[None, :]] = float("-inf")
            best, at = sel.max(dim=-1)   # the first index of the maximum, as argmax
            picked.append(torch.where(torch.isfinite(best), at, -1))
        order = [r for r, _ in plain]
        for seq, r, job, a in zip(seqs, rows, jobs, argmax):
            if a:
                continue
            picked.append(choose(self._allowed(logits[r], job), job.params, seq.history, seq.generator).view(1))
            order.append(r)
        ids = picked[0] if len(picked) == 1 else torch.cat(picked)
        return order, ids

    def _emit_piece(self, seq: _Seq, text: str) -> None:
        if text or seq.logprobs:
            self._send(seq.ticket, Piece(text, tuple(seq.logprobs)))
            seq.logprobs.clear()

    def _finish(self, seq: _Seq, event: Done | Failed, locked: bool = False) -> None:
        """Release ``seq``'s slot and send its last event."""
        self.metrics.ended(event.finish_reason if isinstance(event, Done) else "error")
        if locked:
            self._release(seq)
        else:
            with self._cond:
                self._release(seq)
        self._send(seq.ticket, event)

    def _release(self, seq: _Seq) -> None:
        if seq in self._active:
            self._active.remove(seq)
            self._free_slot(seq)

    def _send(self, ticket: Ticket, event: Event) -> None:
        """(Worker thread.) Queue ``event`` for ``ticket``; it goes out when the step ends."""
        self._outbox.append((ticket, event))

    def _deliver(self) -> None:
        """(Worker thread.) The step's tokens into the metrics, then its events out, in
        order (whoever hears of a token finds it counted; a receiver's wake-ups come
        together: one per step, not one per token)."""
        if self._ttfts or self._itls or self._generated:
            self.metrics.tokens(time.perf_counter(), self._ttfts, self._itls, self._generated)
            self._ttfts, self._itls, self._generated = [], [], 0
        out, self._outbox = self._outbox, []
        for ticket, event in out:
            if ticket.cancelled:
                continue
            try:
                ticket.emit(event)
            except Exception:  # the receiver is gone (closed event loop...): treat as cancelled
                traceback.print_exc()
                ticket.cancelled = True


def _read(t: torch.Tensor) -> list:
    """``t.tolist()`` (the step's one copy to the host); a CUDA tensor is first waited for
    through an event, which releases the GIL while the GPU finishes the step: the event
    loop keeps streaming meanwhile (``tolist`` alone would hold the GIL through the wait)."""
    if t.is_cuda:
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
    return t.tolist()


def _logprob(logits: torch.Tensor, tok: int, k: int) -> TokenLogprob:
    """The log-probability of ``tok`` and the ``k`` best under softmax(logits) (Float32[V])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        vals, ids = torch.topk(lp, k)
        top = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(tok, float(lp[tok]), top)


def run_jobs(scheduler: Scheduler, jobs: Sequence[Job], timeout: float = 300.0) -> list[list[Event]]:
    """Submit ``jobs`` at once and block until each has finished; returns each job's events.
    (For scripts and tests; a server consumes events as they come.)"""
    done = threading.Semaphore(0)
    events: list[list[Event]] = [[] for _ in jobs]

    def collector(i: int) -> Emit:
        def emit(ev: Event) -> None:
            events[i].append(ev)
            if not isinstance(ev, Piece):
                done.release()
        return emit

    for i, job in enumerate(jobs):
        scheduler.submit(job, collector(i))
    for _ in jobs:
        if not done.acquire(timeout=timeout):
            raise TimeoutError("jobs did not finish in time")
    return events
