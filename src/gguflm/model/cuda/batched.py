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
"""

from __future__ import annotations

from typing import Any

import torch

from gguflm.model.arch import RopeStyle
from gguflm.model.config import ModelConfig
from gguflm.model.cuda.decode import attention_splits
from gguflm.model.cuda.forward import Rows, rope_tables
from gguflm.model.cuda.weights import HALF, CudaLayer, CudaWeights
from gguflm.model.kv_cache import KVCache
from gguflm.model.decoder import decoder
from gguflm.model.layers import Rope
from gguflm.kernels.triton.attention import AttentionWorkspace, decode_attention

MIN_WIDTH = 2


def batch_width(n_rows: int) -> int:
    """The padded width of a step of ``n_rows`` rows: the next power of two (at least 2)."""
    w = MIN_WIDTH
    while w < n_rows:
        w *= 2
    return w


class BatchedDecode:
    """The decode step of up to ``width`` sequences of ``cache``, captured on first use."""

    def __init__(self, cfg: ModelConfig, w: CudaWeights, rope: Rope, cache: KVCache, width: int,
                 use_graphs: bool = True, shared_slots: bool = False):
        device = cache.k.device
        H, D = cfg.n_head, cfg.head_dim
        self.cfg, self.w, self.rope, self.cache, self.width = cfg, w, rope, cache, width
        self.use_graphs, self.shared_slots = use_graphs, shared_slots
        self.tok = torch.zeros(width, dtype=torch.long, device=device)
        self.pos = torch.zeros(width, dtype=torch.int32, device=device)
        self.slot = torch.full((width,), -1, dtype=torch.int32, device=device)
        self.attn = torch.zeros(width, H, D, dtype=HALF, device=device)
        self.table = cache.table if cache.paged else None   # Long [n_slots, blocks per slot]
        self.attn_ws = AttentionWorkspace(H, D, attention_splits(cache.n_ctx), device, n_rows=width)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _attention(self, index: int, layer: CudaLayer, qkv: torch.Tensor) -> torch.Tensor:
        # qkv: float16 [W, (H + 2 Hkv) D] -> float16 [W, H D]
        cfg = self.cfg
        cos, sin = rope_tables(self.rope, layer)
        decode_attention(qkv, cos, sin, self.pos, self.cache.k[index], self.cache.v[index], self.attn, self.attn_ws,
                         cfg.scale, cfg.rope_style is RopeStyle.NEOX, slots=self.slot,
                         window=cfg.n_swa if layer.local else 0, table=self.table, shared_slots=self.shared_slots)
        return self.attn.view(self.width, -1)

    def _run(self) -> torch.Tensor:
        ops = Rows(self.cfg, self.w, self.tok)                                      # float32 [W, E]
        decoder(self.w.layers, ops, self._attention)
        return ops.logits()                                                         # float32 [W, n_vocab]

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

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             side: torch.cuda.Stream | None = None, pool: Any = None) -> torch.Tensor:
        """tokens, positions, slots: [B] (B <= width, positions >= 0; distinct (slot,
        position) pairs, distinct slots unless ``shared_slots``) ->
        float32 [B, n_vocab], a view of the graph's buffer (valid until the next step)."""
        n = tokens.numel()
        if n > self.width:
            raise ValueError(f"{n} rows exceed the step's width {self.width}")
        self.tok[:n].copy_(tokens.reshape(-1))
        self.pos[:n].copy_(positions.reshape(-1))
        self.slot[:n].copy_(slots.reshape(-1))
        self.slot[n:].fill_(-1)
        if not self.use_graphs:
            return self._run()[:n]
        if self.graph is None:
            self._capture(side or torch.cuda.Stream(), pool)
        self.graph.replay()
        return self.logits[:n]
