"""Decode steps of many sequences at once (continuous batching on the GPU): B rows, one
new token each, every row in its own cache slot at its own position, padded to a width
W (a power of two) and captured in a CUDA graph per width.

The step is the decoder of :mod:`gguflm.model.decoder` with the many-row ops (:class:`.forward.Rows`:
the fused dequantize x GEMM, which reads each quantized weight once per step, fused
RMSNorm / residual / activation kernels) and the attention of the decode kernel (:func:`gguflm.kernels.triton.attention.decode_attention`): RoPE at each
row's position, the cache write into each row's slot, and attention over that slot's
positions ``0 .. pos``. Padding rows have slot -1: they write nothing and read nothing.
Over a paged cache (:class:`KVCache` with ``block_size``) the kernel finds each position
through the cache's block table (``cache.table``, read on the device at every step: a
captured graph follows the blocks the scheduler hands out between steps).

Rows that share a slot (``shared_slots``, the mixed steps, on unless ``GGUFLM_CUDA_MIXED=0``): a
prompt chunk as one-token rows at consecutive positions of one sequence beside other
sequences' decode rows. The kernel then stores every row's key/value in a launch of its
own before the attention (one more small launch per layer), and a row at position p reads
positions 0..p of its slot, this step's rows included. Its arithmetic is the same as in a
decode step: a prompt token's result does not depend on how its prompt was cut into steps
nor on the rows beside it.

Static buffers (W rows)::

    tok int64 [W], pos int32 [W], slot int32 [W]      inputs, copied in before a replay
    attn float16 [W, H, D]                             attention output
    logits float32 [W, n_vocab]                        output (the graph's own buffer)

Rows do not interact: a row's logits do not depend on what the other rows hold, nor, with
the fused GEMM (the default; split-K fixed per weight) over packed weights, on the width
(:attr:`CudaModel.decode_width_free`): a server's steps then run at the width of their live
rows. Measured on an H200 (TinyLlama-1.1B shape, Q4_K_M) with the former default
(dequantization + cuBLAS, every step pinned to the width of all slots): ~3 ms per step at
any width 1..64 (2.99 ms at 1 row, 3.07 at 32, 3.34 at 64), a lone request on ``--parallel
32`` 301 tok/s vs 1141 through ``generate()``; the split-K GEMM path is not yet measured.

Decode rows through the GEMV (opt-in, ``GGUFLM_CUDA_DECODE_ROWS=gemv``, read at load; on an H200
the former rows kernel cost ~R times the one-row step, 14.5 ms of matmuls at 32 rows; the tile
kernel that replaced it as the default, ~1.5-2 instructions per weight and row instead of 5-10
(benchmarks/cuda_notes.md), on an H100 0.73 / 1.31 / 2.17 / 5.23 ms at 1 / 2 / 8 / 32 rows
against the split-K GEMM's 2.5-2.8 ms: faster up to 8 rows, hence still opt-in): a step of ``decode_width`` Wd > 0 runs its
first Wd rows, the decode rows (one sampled token of each of up to Wd sequences), through
the ops of :class:`~gguflm.model.cuda.decode.DecodeRows` — the fused GEMVs of the one-row step over Wd
activation rows (RMSNorm in the prologue, residual in the epilogue, SwiGLU and QKV in one
launch each), float32 activations, the decode attention without shared slots — and the
rest, the prompt rows of a mixed step, through :class:`Rows` (the fused GEMM) as before. A
row's kernels follow its kind, never the step: a decode row computes the same bits at any
Wd and beside any prompt rows (the rows GEMV's row r is the one-row call on it), a prompt
row the same as in a step without decode rows. The layout of such a step (Wd + Wp rows)::

    rows [0, Wd)        decode rows (padding: slot -1)      DecodeRows, float32
    rows [Wd, Wd + Wp)  prompt rows (padding: slot -1)      Rows, float16 into the GEMM
    logits float32 [Wd, n_vocab] and [Hp, n_vocab]          the heads (a GEMV, the GEMM);
                                                            select_rows gathers a step's selection

The output head of the prompt rows runs on Hp <= Wp of them (the GEMM's rows do not depend
on how many share it): the model gives Hp = min(Wp, the slots' power of two), as a step
samples at most one prompt row per sequence (the last of a prompt), the rows chosen per
step (:meth:`BatchedDecode.head_rows`); more selected prompt rows take a step with Hp = Wp.
A step of prompt rows only (Wd = 0) does the same.

Shapes (:func:`step_shape`, the key of a model's captured step): without decode rows the
live rows' power of two; with them (Wd, Wp, Hp), and a mixed step pads its decode rows to
at least :data:`MIXED_DECODE_WIDTH` and its prompt rows to at least
:data:`MIXED_PROMPT_WIDTH`, so that arrivals beside a varying count of running requests do not
each capture a graph: the server benchmark's loads (32 requests together, trickling or
staggered, a lone one) then use at most 10 shapes, each captured once in the model's LRU of 12
(counted on the CPU by tests/cuda/test_step_shapes.py; not timed on a GPU).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from gguflm.model.arch import RopeStyle
from gguflm.model.config import ModelConfig
from gguflm.model.cuda.decode import DecodeRows, attention_splits
from gguflm.model.cuda.forward import Rows, rope_tables
from gguflm.model.cuda.weights import HALF, CudaLayer, CudaWeights
from gguflm.model.kv_cache import KVCache, host_to_device
from gguflm.model.decoder import decoder
from gguflm.model.layers import Rope
from gguflm.kernels.triton.attention import AttentionWorkspace, decode_attention

MIN_WIDTH = 2
# A mixed step (decode rows beside prompt rows, GGUFLM_CUDA_DECODE_ROWS=gemv) pads its decode
# rows to at least MIXED_DECODE_WIDTH (one 8-row tile of the rows GEMV for most weights) and
# its prompt rows to at least MIXED_PROMPT_WIDTH (one BLOCK_M of the GEMM), so that arrivals
# beside 1 .. 8 running requests share one captured graph (a row's bits depend on neither the
# width nor the other rows: padding rows, slot -1, change nothing). Guesses until timed.
MIXED_DECODE_WIDTH = 8
MIXED_PROMPT_WIDTH = 64


def decode_width(n_rows: int) -> int:
    """The padded count of the decode rows of a step (decode rows through the GEMV): 0 for
    none, else the next power of two (1 included)."""
    return 0 if n_rows == 0 else 1 << (n_rows - 1).bit_length()


def batch_width(n_rows: int) -> int:
    """The padded width of a step of ``n_rows`` rows: the next power of two (at least 2)."""
    w = MIN_WIDTH
    while w < n_rows:
        w *= 2
    return w


def step_shape(n_rows: int, n_decode: int, selected: Sequence[int], n_slots: int,
               decode_rows: bool) -> tuple[int, int, int | None]:
    """The shape of the batched step that runs a mixed step (``CudaModel.forward`` with
    ``select``) of ``n_rows`` one-token rows, the first ``n_decode`` of them decode rows,
    whose logits are wanted at input rows ``selected`` (read only with ``decode_rows``),
    over a cache of ``n_slots`` slots -> (width, decode width, head rows): the key of its
    captured graph beside the cache (``head rows`` None: the head over every prompt row).
    Without ``decode_rows`` (``GGUFLM_CUDA_DECODE_ROWS``) every row goes through the GEMM
    at the width :func:`batch_width`; with it the decode rows are padded to
    :func:`decode_width`, the prompt rows to :func:`batch_width` (in a mixed step at least
    :data:`MIXED_DECODE_WIDTH` and :data:`MIXED_PROMPT_WIDTH`), and the prompt rows' head
    runs on min(prompt width, the slots' power of two) rows unless more are selected."""
    if not decode_rows:
        return batch_width(n_rows), 0, None
    if not 0 <= n_decode <= n_rows:
        raise ValueError(f"{n_decode} decode rows in a step of {n_rows}")
    dw, pw = decode_width(n_decode), (batch_width(n_rows - n_decode) if n_rows > n_decode else 0)
    if dw and pw:                     # a mixed step: coarser buckets (see MIXED_DECODE_WIDTH)
        dw, pw = max(dw, MIXED_DECODE_WIDTH), max(pw, MIXED_PROMPT_WIDTH)
    hp = min(pw, batch_width(n_slots))
    if sum(i >= n_decode for i in selected) > hp:
        hp = pw
    return dw + pw, dw, (hp if hp < pw else None)


class BatchedDecode:
    """The decode step of up to ``width`` sequences of ``cache``, captured on first use;
    with ``decode_width`` Wd > 0 its first Wd rows are decode rows through the GEMV (see the
    module docstring), the other ``width - Wd`` prompt rows."""

    def __init__(self, cfg: ModelConfig, w: CudaWeights, rope: Rope, cache: KVCache, width: int,
                 use_graphs: bool = True, shared_slots: bool = False, decode_width: int = 0,
                 head_rows: int | None = None):
        device = cache.k.device
        H, D = cfg.n_head, cfg.head_dim
        if not 0 <= decode_width <= width:
            raise ValueError(f"decode width {decode_width} outside 0 .. {width}")
        self.cfg, self.w, self.rope, self.cache, self.width = cfg, w, rope, cache, width
        self.use_graphs, self.shared_slots = use_graphs, shared_slots
        self.dw, self.pw = decode_width, width - decode_width
        # prompt rows whose logits the step computes (the output head over those only)
        self.hp = self.pw if head_rows is None else min(head_rows, self.pw)
        if self.pw and not 2 <= self.hp <= self.pw:
            raise ValueError(f"{self.hp} head rows of {self.pw} prompt rows (at least 2: the GEMM)")
        self.head_idx = torch.zeros(self.hp, dtype=torch.long, device=device)
        self.tok = torch.zeros(width, dtype=torch.long, device=device)
        self.pos = torch.zeros(width, dtype=torch.int32, device=device)
        self.slot = torch.full((width,), -1, dtype=torch.int32, device=device)
        self.attn = torch.zeros(self.pw, H, D, dtype=HALF, device=device)
        self.table = cache.table if cache.paged else None   # Long [n_slots, blocks per slot]
        splits = attention_splits(cache.n_ctx)
        self.attn_ws = AttentionWorkspace(H, D, splits, device, n_rows=max(self.pw, 1))
        self.dec: DecodeRows | None = None
        if self.dw:
            self.dec = DecodeRows(cfg, w, self.dw, device)
            self.dec_ws = AttentionWorkspace(H, D, splits, device, n_rows=self.dw)
            self.out = torch.empty(self.dw, cfg.n_vocab, dtype=torch.float32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Any = None       # the graph's outputs
        self._last: Any = None        # the last step's outputs

    def _attend(self, index: int, layer: CudaLayer, qkv: torch.Tensor, rows: slice, out: torch.Tensor,
                ws: AttentionWorkspace, shared: bool) -> torch.Tensor:
        cfg = self.cfg
        cos, sin = rope_tables(self.rope, layer)
        return decode_attention(qkv, cos, sin, self.pos[rows], self.cache.k[index], self.cache.v[index], out, ws,
                                cfg.scale, cfg.rope_style is RopeStyle.NEOX, slots=self.slot[rows],
                                window=cfg.n_swa if layer.local else 0, table=self.table, shared_slots=shared)

    def _attention(self, index: int, layer: CudaLayer, qkv: torch.Tensor) -> torch.Tensor:
        # qkv: float16 [W, (H + 2 Hkv) D] -> float16 [W, H D]
        self._attend(index, layer, qkv, slice(0, self.width), self.attn, self.attn_ws, self.shared_slots)
        return self.attn.view(self.width, -1)

    def _kinds_attention(self, index: int, layer: CudaLayer, qkv: tuple) -> tuple:
        """Decode rows (float32, their own slots: no shared slots, as the one-row step), then
        the prompt rows (float16, shared slots as the batched step): disjoint slots."""
        q_dec, q_rows = qkv
        a_dec = self._attend(index, layer, q_dec, slice(0, self.dw), self.dec.attn, self.dec_ws, False)
        if q_rows is None:
            return a_dec, None
        self._attend(index, layer, q_rows, slice(self.dw, self.width), self.attn, self.attn_ws, self.shared_slots)
        return a_dec, self.attn.view(self.pw, -1)

    def _run(self) -> Any:
        if self.dec is None:
            ops = Rows(self.cfg, self.w, self.tok)                                  # float32 [W, E]
            decoder(self.w.layers, ops, self._attention)
            if self.hp < self.pw:                                                   # the head rows only
                return ops.logits(ops.flush().index_select(0, self.head_idx))       # float32 [Hp, n_vocab]
            return ops.logits()                                                     # float32 [W, n_vocab]
        self.dec.embed(self.tok[:self.dw])
        rows = Rows(self.cfg, self.w, self.tok[self.dw:]) if self.pw else None
        decoder(self.w.layers, KindRows(self.dec, rows), self._kinds_attention)
        if rows is None:
            return self.dec.logits(self.out), None
        x = rows.flush()
        return self.dec.logits(self.out), rows.logits(x if self.hp == self.pw else x.index_select(0, self.head_idx))

    def _capture(self, side: torch.cuda.Stream, pool: Any) -> None:
        """Warm up on the side stream (compiling every kernel; the inputs are the coming
        step's, so the warm-up writes what the step writes), then capture there."""
        torch.cuda.synchronize()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=side):
            self.logits = self._run()
        self.graph = graph

    def _inputs(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, n_decode: int) -> None:
        """Rows [0, n_decode) of the inputs into the decode rows, the rest into the prompt rows."""
        n = tokens.numel()
        tokens, positions, slots = tokens.reshape(-1), positions.reshape(-1), slots.reshape(-1)
        if self.dw == 0:
            n_decode = 0
        if n_decode > self.dw or n - n_decode > self.pw:
            raise ValueError(f"{n_decode} decode and {n - n_decode} prompt rows exceed the step's "
                             f"{self.dw} + {self.pw}")
        self.slot.fill_(-1)
        for src, dst in ((slice(0, n_decode), slice(0, n_decode)),
                         (slice(n_decode, n), slice(self.dw, self.dw + n - n_decode))):
            self.tok[dst].copy_(tokens[src])
            self.pos[dst].copy_(positions[src])
            self.slot[dst].copy_(slots[src])

    def head_rows(self, index: list[int], n_decode: int) -> torch.Tensor | None:
        """Before :meth:`step` of a step computing ``hp < pw`` prompt rows' logits: put the
        selected prompt rows of ``index`` (host list of input rows, at most ``hp`` of them
        prompt rows) into its head rows -> the rows of ``cat(decode logits, head logits)``
        that hold input rows ``index``, for :meth:`select_rows`."""
        prompt = [i - n_decode for i in index if i >= n_decode]
        if len(prompt) > self.hp:
            raise ValueError(f"{len(prompt)} selected prompt rows exceed the step's {self.hp} head rows")
        self.head_idx.copy_(host_to_device(prompt + [0] * (self.hp - len(prompt)), self.head_idx.device))
        at, j = [], 0
        for i in index:
            if i < n_decode:
                at.append(i)
            else:
                at.append(self.dw + j)
                j += 1
        return host_to_device(at, self.head_idx.device)   # pinned: no wait for a step in flight

    def select_rows(self, index: torch.Tensor, n_decode: int, at: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [len(index), n_vocab]: the logits of input rows ``index`` (Long, on the
        device) of the last :meth:`step` (``n_decode`` decode rows): with a decode width
        gathered from the decode rows' and the prompt rows' buffers, no host sync; with
        fewer head rows than prompt rows, ``at`` from :meth:`head_rows`."""
        if self.dec is None:
            return self._last.index_select(0, index if self.hp == self.pw else at)
        dec, rows = self._last
        if rows is None:
            return dec.index_select(0, index)
        if self.hp < self.pw:                 # the head rows (see head_rows)
            return torch.cat([dec, rows]).index_select(0, at)
        first = index < n_decode
        d = dec.index_select(0, index.clamp(max=self.dw - 1))
        r = rows.index_select(0, (index - n_decode).clamp(min=0, max=self.pw - 1))
        return torch.where(first[:, None], d, r)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             side: torch.cuda.Stream | None = None, pool: Any = None, n_decode: int | None = None) -> torch.Tensor:
        """tokens, positions, slots: [B] (B <= width, positions >= 0; distinct (slot,
        position) pairs, distinct slots unless ``shared_slots``) ->
        float32 [B, n_vocab], a view of the graph's buffer (valid until the next step).
        With a decode width: the first ``n_decode`` rows (default: all) are decode rows
        (distinct slots), the others prompt rows; -> the decode rows' logits [Wd, n_vocab]
        (the prompt rows' through :meth:`select_rows`). With fewer head rows than prompt rows
        (:meth:`head_rows`) and no decode width: the head rows' logits [Hp, n_vocab]."""
        n = tokens.numel()
        if n > self.width:
            raise ValueError(f"{n} rows exceed the step's width {self.width}")
        self._inputs(tokens, positions, slots, n if n_decode is None else n_decode)
        if not self.use_graphs:
            logits = self._run()
        else:
            if self.graph is None:
                self._capture(side or torch.cuda.Stream(), pool)
            self.graph.replay()
            logits = self.logits
        self._last = logits
        return logits[0] if self.dec is not None else logits[:n]


class KindRows:
    """The ops of :mod:`gguflm.model.decoder` over a step's two kinds of rows: the decode
    rows (:class:`DecodeRows`, the GEMV) and the prompt rows (:class:`Rows`, the GEMM; None
    when the step has none), each op run on both; values are (decode, prompt) pairs."""

    def __init__(self, dec: DecodeRows, rows: Rows | None):
        self.dec, self.rows = dec, rows

    def norm_linear(self, weight: torch.Tensor, lins: tuple) -> tuple:
        return (self.dec.norm_linear(weight, lins),
                self.rows.norm_linear(weight, lins) if self.rows is not None else None)

    def head_norm(self, qkv: tuple, q_norm: torch.Tensor, k_norm: torch.Tensor) -> tuple:
        return (self.dec.head_norm(qkv[0], q_norm, k_norm),
                self.rows.head_norm(qkv[1], q_norm, k_norm) if self.rows is not None else None)

    def linear_add(self, a: tuple, lin, post: torch.Tensor | None) -> None:
        self.dec.linear_add(a[0], lin, post)
        if self.rows is not None:
            self.rows.linear_add(a[1], lin, post)

    def norm_gated(self, layer: CudaLayer) -> tuple:
        return self.dec.norm_gated(layer), self.rows.norm_gated(layer) if self.rows is not None else None
