"""``gguflm.load(path, device="cuda")``: the :class:`Model` interface on an NVIDIA GPU.

A :class:`CudaModel` keeps the weights in their GGUF encoding (:mod:`.weights`) and
runs two paths over float16 KV caches:

* many tokens (prefill, padded rows, ``logits``): :mod:`.forward`, a prefill captured once
  its shape repeats;
* one token of one sequence: the CUDA-graph decode step (:mod:`.decode`), used by
  ``forward`` whenever B = T = 1, and by :meth:`CudaModel.decode_greedy`;
* one token of each of B > 1 sequences (the server's decode steps): the batched step
  (:mod:`.batched`), padded to a power-of-two width and captured per width.

All of them run the one decoder of :mod:`gguflm.model.decoder` (every architecture of the arch table).

Paged KV cache (opt-in: ``GGUFLM_CUDA_PAGED=1``, or ``gguflm serve --device cuda
--kv-size N``; :meth:`CudaModel.use_paged_cache`): the scheduler then gives the model a
:class:`KVCache` of blocks (``--kv-size``, prefix bookkeeping, preemption as on the CPU);
one-token steps run the batched step reading/writing the blocks through the block table
(any number of rows, one included), runs of tokens the padded-rows path
(:func:`.forward.forward_tokens`: RoPE in torch, :meth:`KVCache.update`'s gather, SDPA).
The single-sequence decode graph and the captured prefills address one contiguous slot
and are not used over a paged cache. Not measured on a GPU yet: the default stays the
contiguous cache.

Mixed steps (the default; ``GGUFLM_CUDA_MIXED=0`` turns them off; read at load; over either cache):
:attr:`CudaModel.flat_steps`, so that a scheduler over a batch-invariant model feeds prompt
chunks as one-token rows of the batched step beside the decode rows (chunked prefill mixed
with decode, :meth:`gguflm.engine.scheduler.Scheduler._mixed_step`); ``forward`` with
``select`` runs them, and every batched step of the model stores its keys/values in a
launch of its own (:class:`BatchedDecode` ``shared_slots``), so a row computes the same in
a mixed step as in a pure decode step. Steps are captured per power-of-two width up to
the scheduler's token budget. Measured on an H200 (TinyLlama-1.1B shape Q4_K_M, 32
concurrent streaming chats of 256 tokens, benchmarks/results/2026-12-05-h200-server.json):
5020 tok/s end to end and TTFT p50 74 ms, vs 3143 tok/s and 643 ms without them (prompts
prefilled one request at a time), every stream bit-identical to the request alone.

Decode rows through the GEMV (opt-in: ``GGUFLM_CUDA_DECODE_ROWS=gemv``, read at load; its
matmuls beat the GEMM up to 8 rows on an H100, not at 32: benchmarks/cuda_notes.md): :attr:`CudaModel.row_kinds`. The batched step then runs its decode rows
(a sampled token of each sequence) through the fused GEMVs of the one-row step over many
rows and its prompt rows through the fused GEMM (:mod:`.batched`), a row's kernels chosen by
its kind, never by the step; ``forward`` with ``select`` takes ``n_decode`` (the leading
decode rows), and steps are captured per (decode width, prompt width), powers of two. Meant
for the lone request on a wide server (the one-row GEMV step costs ~0.88 ms on the H200, the
GEMM step ~2.6-3.6 ms at any width) and small decode batches.

``forward`` returns logits on the GPU; the engine's sampling chain then runs there
too, and the only host sync per token is reading the sampled id. ``decode_one`` feeds
the decode graph from device tensors (a token the device chose, a position counted
there): the one-slot loop launches the next step before it reads the last id.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from gguflm.model.kv_cache import KVCache
from gguflm.gguf.reader import GGUFFile
from gguflm.model.config import ModelConfig
from gguflm.model.cuda.batched import BatchedDecode, batch_width, decode_width, step_shape
from gguflm.model.cuda.decode import DecodeGraphs
from gguflm.model.cuda.forward import PREFILL_BUCKETS, forward_plain, forward_tokens, plain_start, prefill_bucket
from gguflm.model.cuda.weights import HALF, CudaWeights, fused_gemm
from gguflm.model.layers import Rope
from gguflm.model.model import Model

MAX_GRAPHS = 4  # captured decode graphs kept (one per cache slot in use), least recent dropped
MAX_PREFILL_GRAPHS = 2  # captured prefills of other shapes kept, least recent dropped
MAX_BUCKET_GRAPHS = 2 * len(PREFILL_BUCKETS)  # prompt-length graphs kept (all cache slots), least recent dropped
MAX_BATCHED = 12  # batched steps kept (one per cache, width, decode width, head rows), least recent dropped


def _lru(table: OrderedDict, key: tuple, limit: int, make: Any) -> Any:
    """``table[key]``, made by ``make()`` on first use; the least recent beyond ``limit`` dropped."""
    if key not in table:
        table[key] = make()
        while len(table) > limit:
            table.popitem(last=False)
    table.move_to_end(key)
    return table[key]


class CudaModel(Model):
    """A model whose weights live on a CUDA device in their quantized form. Not
    ``batch_invariant`` (except in mixed steps, below): one row decodes through the fused GEMVs (float32 activations),
    several through the batched step (float16 activations into the fused GEMM), and
    prompts through attention kernels that depend on the step's shape (one sequence or
    padded rows, where a chunk starts). :meth:`pin_decode_width` makes every one-token
    step over a cache run the batched step (one row too), so that a row computes the
    same whoever shares its step: at the width of the live rows where
    :attr:`decode_width_free` (a row of the batched step gives the same bits at any
    width: the fused GEMM runs every linear of it), else at one width for all steps
    (``GGUFLM_MATMUL=cublas``, a float16 fallback weight: cuBLAS rounds by shape).

    With mixed steps (the default; ``GGUFLM_CUDA_MIXED=0``: off) where :attr:`decode_width_free`, every token of a
    scheduler's steps, prompt tokens included, is a row of the batched step (:attr:`flat_steps`):
    the model is then ``batch_invariant`` for those steps (a row's bits depend neither on
    the width, nor on the other rows, nor on how its prompt was cut into chunks), and a
    scheduler mixes prompt chunks with decode rows and reuses cached prompt blocks."""

    paged_cache = False  # by default one contiguous block per slot (see the module docstring)

    def __init__(self, file: GGUFFile, config: ModelConfig, weights: CudaWeights,
                 n_ctx: int, device: torch.device, use_graphs: bool = True):
        super().__init__(file, config, None, n_ctx, device)
        self.weights = weights
        self._all_packed = all(lin.packed is not None for lin in
                               [weights.output] + [lin for layer in weights.layers for lin in layer.linears()])
        self.rope = Rope(config, n_ctx, weights.rope_freqs, device)
        self.use_graphs = use_graphs
        self._graphs: OrderedDict[tuple[int, int], DecodeGraphs] = OrderedDict()
        self._batched: OrderedDict[tuple[int, int], BatchedDecode] = OrderedDict()
        self._pinned: dict[int, int] = {}   # cache data_ptr -> the width of all its one-token steps
        self._prefills: OrderedDict[tuple, Any] = OrderedDict()   # key -> seen once (None) or (graph, tokens, out)
        self._buckets: OrderedDict[tuple, tuple] = OrderedDict()   # (bucket, cache, slot, last_only) -> graph...
        self._pool: Any = None
        self._side: torch.cuda.Stream | None = None    # warm-ups and captures of prefills
        self._session: KVCache | None = None
        self.mixed_steps = os.environ.get("GGUFLM_CUDA_MIXED", "1") != "0"   # see the module docstring
        # decode rows of the batched step through the GEMV (opt-in; see row_kinds)
        self.decode_rows = os.environ.get("GGUFLM_CUDA_DECODE_ROWS", "").lower() == "gemv"
        if os.environ.get("GGUFLM_CUDA_PAGED", "0") == "1":
            self.use_paged_cache(True)

    @property
    def batch_invariant(self) -> bool:   # see the class docstring
        return self.mixed_steps and self.decode_width_free

    @property
    def row_kinds(self) -> bool:
        """:attr:`Model.row_kinds`: with ``GGUFLM_CUDA_DECODE_ROWS=gemv`` (opt-in, read at load;
        not yet measured on a GPU) the batched step runs its decode rows (a sampled token of
        each sequence) through the fused GEMVs of the one-row step over many rows
        (:class:`~gguflm.model.cuda.decode.DecodeRows`) and its prompt rows through the
        fused GEMM (:mod:`.batched`): ``forward`` then takes ``n_decode``, the count of the
        leading decode rows of a mixed step. A row's bits depend on its kind, never on the
        step's width or company."""
        return self.decode_rows

    @property
    def flat_steps(self) -> bool:
        """:attr:`Model.flat_steps`: with mixed steps (the default) over width-free kernels
        (a prompt token's row then computes the same in any company and any chunking)."""
        return self.batch_invariant

    def flat_steps_over(self, cache: KVCache) -> bool:
        """The batched step takes a paged or a contiguous cache."""
        return self.flat_steps

    def use_paged_cache(self, enable: bool) -> None:
        """Schedulers made from now on give this model a paged cache (see the module docstring)."""
        self.paged_cache = enable

    def new_cache(self, n_slots: int = 1, n_ctx: int | None = None, block_size: int | None = None,
                  n_blocks: int | None = None) -> KVCache:
        """An empty float16 KV cache on the device: one contiguous block per slot, or with
        ``block_size`` a pool of ``n_blocks`` blocks (see :class:`KVCache`)."""
        c = self.config
        n_ctx = n_ctx or self.n_ctx
        if n_ctx > self.n_ctx:
            raise ValueError(f"a cache of {n_ctx} positions exceeds the model's context of {self.n_ctx}")
        return KVCache(c.n_layer, n_slots, c.n_head_kv, n_ctx, c.head_dim, dtype=HALF, device=self.device,
                       block_size=block_size, n_blocks=n_blocks)

    def graphs(self, cache: KVCache, slot: int) -> DecodeGraphs:
        """The decode graphs of one cache slot (built on first use; they hold views of the
        cache, so its address keeps the key unique)."""
        return _lru(self._graphs, (cache.k.data_ptr(), slot), MAX_GRAPHS, lambda: DecodeGraphs(
            self.config, self.weights, self.rope, cache.k[:, slot], cache.v[:, slot], use_graphs=self.use_graphs))

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor, last_only: bool = False, select: torch.Tensor | None = None,
                n_decode: int | None = None, selected: Sequence[int] | None = None) -> torch.Tensor:
        """Batched step (see :meth:`Transformer.forward`). One token of one sequence runs
        the decode graph; one token of each of several sequences the batched step (rows
        of a T = 1 step must have positions >= 0 and distinct slots); a run of tokens of
        one sequence (a prefill) runs eagerly the first time its shape (length, start,
        slot) is seen and from a captured graph after that. Over a cache pinned by
        :meth:`pin_decode_width`, every one-token step is a batched step (of the pinned
        width unless :attr:`decode_width_free`) and prefills always run eagerly. Graph
        outputs are buffers that the graph's next replay overwrites. Over a paged cache: one-token steps run the batched step,
        other steps the padded-rows path. ``select`` (Long, flat row indices): a mixed step of
        one-token rows that may share slots (see the module docstring) -> float32
        [len(select), n_vocab], the logits of those rows. ``n_decode`` (with :attr:`row_kinds`):
        the first ``n_decode`` rows of such a step are decode rows (default: none); ``selected``:
        ``select``'s values on the host (else read from the device: a wait for a step in flight)."""
        if select is not None:
            if tokens.shape[1] != 1 or cache.k.dtype != HALF:
                raise ValueError("a step with select is one token per row over a float16 cache")
            n, n_dec = tokens.shape[0], (n_decode or 0) if self.decode_rows else 0
            index = (list(selected) if selected is not None else select.tolist()) if self.decode_rows else []
            width, dw, hp = step_shape(n, n_dec, index, cache.n_slots, self.decode_rows)
            step = self.batched(cache, n, width=width, decode_width=dw, head_rows=hp)
            if not self.decode_rows:
                return step.step(tokens, positions, slots, *self._stream_and_pool()).index_select(0, select)
            at = step.head_rows(index, n_dec) if step.hp < step.pw else None
            step.step(tokens, positions, slots, *self._stream_and_pool(), n_decode=n_dec)
            return step.select_rows(select, n_dec, at)
        on_gpu = self.use_graphs and cache.k.dtype == HALF and cache.k.device.type == "cuda"
        pinned = self._pinned.get(cache.k.data_ptr())
        if tokens.shape[1] == 1 and (tokens.shape[0] > 1 or pinned or cache.paged) and cache.k.dtype == HALF:
            n = tokens.shape[0]
            width = None if self.decode_width_free else pinned       # None: the live rows' width
            if self.decode_rows:                                     # every row a decode row
                width = decode_width(n) if width is None else width
                step = self.batched(cache, n, width=width, decode_width=width)
                logits = step.step(tokens, positions, slots, *self._stream_and_pool())[:n]
            else:
                step = self.batched(cache, n, width=width)
                logits = step.step(tokens, positions, slots, *self._stream_and_pool())
            return logits if last_only else logits[:, None]
        if on_gpu and tokens.shape == (1, 1):
            logits = self.decode_one(tokens.view(1), positions.view(1), cache, int(slots[0]))
            return logits if last_only else logits[:, None]
        p0 = plain_start(positions) if tokens.shape[0] == 1 and not cache.paged else None
        if p0 is None:
            return forward_tokens(self.config, self.weights, self.rope, tokens, positions, cache, slots, last_only)
        if on_gpu and not pinned:
            return self._prefill(tokens[0], p0, cache, int(slots[0]), last_only)
        slot = int(slots[0])
        return forward_plain(self.config, self.weights, self.rope, tokens[0], p0, cache.k[:, slot], cache.v[:, slot],
                             last_only)

    @torch.inference_mode()
    def decode_one(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache, slot: int) -> torch.Tensor:
        """:meth:`Model.decode_one`: the slot's decode graph fed by device-to-device copies
        (nothing waits for the host); elsewhere :meth:`forward`. The logits are the graph's
        buffer, which the next replay overwrites."""
        if (self.use_graphs and cache.k.dtype == HALF and cache.k.device.type == "cuda"
                and cache.k.data_ptr() not in self._pinned and not cache.paged):
            g = self.graphs(cache, slot)
            g.tok[0:1].copy_(token)
            g.pos[0:1].copy_(position)
            g.step(0)
            return g.buf.logits_buf.view(1, -1)
        return super().decode_one(token, position, cache, slot)

    def forget_shapes(self, buckets: bool = False) -> None:
        """Drop the prefill graphs captured for shapes seen twice (runs that do not start at
        position 0): the next such run of any shape runs as a new one does (eagerly); with
        ``buckets``, the prompt lengths' graphs too (the next prompt of each length captures
        its graph again). For measuring what a never-seen prompt costs."""
        self._prefills.clear()
        if buckets:
            self._buckets.clear()

    @property
    def decode_width_free(self) -> bool:
        """A row of the batched step computes the same bits at any width: every linear it
        runs (the layers' and the output head) is packed and the fused GEMM is on (its
        reduction order is fixed per weight; norms and the decode attention go row by
        row). Then a pinned cache's steps run at the width of their live rows."""
        return self._all_packed and fused_gemm()

    def pin_decode_width(self, cache: KVCache) -> None:
        """Every later one-token step over ``cache`` (one row too) runs the batched step:
        at the width of its live rows where :attr:`decode_width_free`, else at the width
        of all its slots (see the class docstring)."""
        self._pinned[cache.k.data_ptr()] = batch_width(cache.n_slots)

    def batched(self, cache: KVCache, n_rows: int, width: int | None = None, decode_width: int = 0,
                head_rows: int | None = None) -> BatchedDecode:
        """The batched decode step for ``n_rows`` rows of ``cache`` (built on first use), at
        ``width`` or the smallest power of two that holds them; its first ``decode_width``
        rows decode rows through the GEMV (:attr:`row_kinds`), the output head over
        ``head_rows`` of its prompt rows (default: all). One captured step per (cache,
        width, decode width, head rows), at most :data:`MAX_BATCHED` kept: the server's
        steps take their shapes from :func:`~gguflm.model.cuda.batched.step_shape` (with row
        kinds bucketed pairs (decode rows, prompt rows) of powers of two: at most 10 for
        the server benchmark's loads, counted by tests/cuda/test_step_shapes.py)."""
        width = width or min(batch_width(n_rows), batch_width(cache.n_slots))
        head = head_rows if head_rows is not None and head_rows < width - decode_width else None
        return _lru(self._batched, (cache.k.data_ptr(), width, decode_width, head), MAX_BATCHED,
                    lambda: BatchedDecode(self.config, self.weights, self.rope, cache, width,
                                          use_graphs=self.use_graphs and cache.k.device.type == "cuda",
                                          shared_slots=self.mixed_steps, decode_width=decode_width, head_rows=head))

    def _stream_and_pool(self) -> tuple[Any, Any]:
        """The side stream and memory pool of every capture (CUDA only; else None, None)."""
        if self.device.type != "cuda":
            return None, None
        if self._side is None:
            self._side = torch.cuda.Stream()
            self._pool = torch.cuda.graph_pool_handle()
        return self._side, self._pool

    def _prefill(self, tokens: torch.Tensor, p0: int, cache: KVCache, slot: int, last_only: bool) -> torch.Tensor:
        """A run of one sequence's tokens from ``p0``. From position 0 (a new prompt) the
        tokens are padded to their :func:`prefill_bucket` and run that length's captured graph,
        captured on its first prompt: a fresh prompt of any length up to the largest bucket
        replays a graph (the host launches one graph instead of ~10 kernels per layer). The
        padding rows come after the prompt's: causal attention keeps them out of its rows, and
        the keys/values they leave past the prompt are overwritten before any step reads them.
        Other runs: eager the first time their shape is seen, captured the second time."""
        T = tokens.numel()
        k_cache, v_cache = cache.k[:, slot], cache.v[:, slot]
        bucket = prefill_bucket(T, k_cache.shape[2]) if p0 == 0 else None
        if bucket is not None:
            return self._bucket_prefill(tokens, bucket, cache.k.data_ptr(), slot, k_cache, v_cache, last_only)
        key = (T, p0, cache.k.data_ptr(), slot, last_only)

        def run(toks: torch.Tensor) -> torch.Tensor:
            return forward_plain(self.config, self.weights, self.rope, toks, p0, k_cache, v_cache, last_only)

        if key not in self._prefills:                     # first sighting: eager
            self._remember(key, None)
            return run(tokens)
        entry = self._prefills[key]
        if entry is None:                                 # second: warm up on a side stream, capture
            entry = self._capture(run, tokens.clone())
            self._remember(key, entry)
        graph, buf, out = entry
        self._prefills.move_to_end(key)
        buf.copy_(tokens)
        graph.replay()
        return out

    def _bucket_prefill(self, tokens: torch.Tensor, bucket: int, cache_id: int, slot: int,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, last_only: bool) -> torch.Tensor:
        T = tokens.numel()
        key = (bucket, cache_id, slot, last_only)

        def make() -> tuple:
            last = torch.zeros(1, dtype=torch.long, device=tokens.device)            # the prompt's last row

            def run(toks: torch.Tensor) -> torch.Tensor:
                return forward_plain(self.config, self.weights, self.rope, toks, 0, k_cache, v_cache, last_only,
                                     last=last if last_only else None)

            padded = torch.zeros(bucket, dtype=tokens.dtype, device=tokens.device)
            return *self._capture(run, padded), last

        graph, buf, out, last = _lru(self._buckets, key, MAX_BUCKET_GRAPHS, make)
        buf[:T].copy_(tokens)
        buf[T:].zero_()
        last.fill_(T - 1)
        graph.replay()
        return out if last_only else out[:, :T]

    def _capture(self, run, buf: torch.Tensor) -> tuple:
        """Warm up ``run(buf)`` on the side stream, then capture it there. The cached blocks
        of earlier eager runs are released first, so that the capture does not add its
        private pool on top of them (the process's peak memory)."""
        self._stream_and_pool()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            run(buf)
        self._side.synchronize()
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._side):
            out = run(buf)
        return graph, buf, out

    def _remember(self, key: tuple, entry: Any) -> None:
        self._prefills[key] = entry
        self._prefills.move_to_end(key)
        while len(self._prefills) > 2 * MAX_PREFILL_GRAPHS:
            self._prefills.popitem(last=False)
        captured = [k for k, e in self._prefills.items() if e is not None]
        for k in captured[:-MAX_PREFILL_GRAPHS]:
            del self._prefills[k]

    def session_cache(self) -> KVCache:
        """The one-sequence cache that ``generate`` reuses (no clearing needed, see KVCache)."""
        if self._session is None:
            self._session = self.new_cache(1)
        return self._session

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], cache: KVCache | None = None) -> torch.Tensor:
        """Run ``ids`` from position 0 into ``cache`` (default: the session cache), eagerly;
        the float32 logits [n_vocab] of the last token, on the device."""
        cache = cache or self.session_cache()
        tokens = torch.tensor(list(ids), device=self.device)
        return forward_plain(self.config, self.weights, self.rope, tokens, 0, cache.k[:, 0], cache.v[:, 0], True)[0]

    @torch.inference_mode()
    def decode_greedy(self, first: int, position: int, n: int, cache: KVCache | None = None) -> torch.Tensor:
        """``n`` greedy steps from token ``first`` at ``position``, back to back on the
        device with no host sync: the int64 [n] generated ids (on the device)."""
        cache = cache or self.session_cache()
        if position + n > cache.n_ctx:
            raise ValueError(f"{n} steps from position {position} overrun the context of {cache.n_ctx}")
        g = self.graphs(cache, 0)
        g.tok[0] = first
        g.pos[0] = position
        for i in range(n):
            g.step(i % 2)
        return g.history[position + 1:position + 1 + n].clone()
