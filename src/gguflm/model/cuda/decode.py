"""The batch-1 decode step as a fixed sequence of kernels over static buffers, captured
once in a CUDA graph and replayed for every token.

Per layer (x: the float32 residual stream, pos: the position, both on the device)::

    qkv = Wqkv RMSNorm(x)                 fused GEMV, norm in the prologue
    a = attention(rope(q), K[:pos+1], V[:pos+1])   RoPE, the cache write of the new key
                                          and value, and attention split over positions;
                                          then a merge of the splits
    x = x + Wo a                          GEMV, residual in the epilogue (in place)
    f = silu(Wg RMSNorm(x)) * Wu RMSNorm(x)   one GEMV over both weights
    x = x + Wd f                          GEMV, residual in the epilogue

then ``logits = Wout RMSNorm(x)`` and the greedy ``next = argmax(logits)``. Nothing
reads the host: the token and the position are device buffers, so a replay needs no
arguments. Two graphs that hand each other their inputs (``(tok, pos)`` ->
``(next, pos + 1)`` and back) let greedy decoding run back to back with no launch or
copy in between.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gguflm.model.config import ModelConfig
from gguflm.model.arch import RopeStyle
from gguflm.model.cuda.weights import CudaWeights
from gguflm.model.layers import Rope
from gguflm.kernels.triton.attention import AttentionWorkspace, decode_attention
from gguflm.quant.cuda.gemv import ArgmaxWorkspace, gemv_argmax, gemv_multi, gemv_swiglu


def attention_splits(n_ctx: int) -> int:
    """Position ranges of the split attention: about 128 positions each, 1..32 (a power of two)."""
    n = 1
    while n < 32 and n * 128 < n_ctx:
        n *= 2
    return n


class DecodeBuffers:
    """Static inputs, activations and outputs of one decode step."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, device: torch.device):
        H, Hkv, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        f32 = dict(dtype=torch.float32, device=device)
        self.x = torch.empty(cfg.n_embd, **f32)
        self.qkv = torch.empty((H + 2 * Hkv) * D, **f32)
        self.attn = torch.empty(H, D, **f32)
        self.gate = torch.empty(cfg.n_ff, **f32)
        self.up = torch.empty(cfg.n_ff, **f32)
        self.ff = torch.empty(cfg.n_ff, **f32)
        self.logits = torch.empty(cfg.n_vocab, **f32)
        self.attn_ws = AttentionWorkspace(H, D, attention_splits(n_ctx), device)
        self.argmax_ws = ArgmaxWorkspace(device)


def decode_step(cfg: ModelConfig, w: CudaWeights, rope: Rope, buf: DecodeBuffers,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                tok: torch.Tensor, pos: torch.Tensor, next_tok: torch.Tensor, next_pos: torch.Tensor) -> None:
    """One token: tok int64 [1], pos int32 [1] -> buf.logits, next_tok = argmax,
    next_pos = pos + 1. k_cache/v_cache: [n_layer, Hkv, n_ctx, D] of one sequence."""
    D = cfg.head_dim
    eps, neox = cfg.rms_eps, cfg.rope_style is RopeStyle.NEOX
    x = buf.x
    w.token_embd.rows(tok, out=x.view(1, -1))
    for i, layer in enumerate(w.layers):
        if all(lin.packed is not None and lin.bias is None for lin in layer.qkv):
            # one launch: the stacked [Wq; Wk; Wv], or the three of different types as segments
            outs = buf.qkv.split([lin.n_out for lin in layer.qkv])
            gemv_multi([lin.packed for lin in layer.qkv], x, outs, norm_weight=layer.attn_norm, eps=eps)
        else:
            start = 0
            for lin in layer.qkv:  # one fused [Wq; Wk; Wv], or the three apart
                lin.gemv(x, buf.qkv[start:start + lin.n_out], norm_weight=layer.attn_norm, eps=eps)
                start += lin.n_out
        decode_attention(buf.qkv, rope.cos, rope.sin, pos, k_cache[i], v_cache[i], buf.attn, buf.attn_ws,
                         D ** -0.5, neox)
        layer.wo.gemv(buf.attn.view(-1), x, residual=x)
        if layer.swiglu_fused:
            gemv_swiglu(layer.w_gate.packed, layer.w_up.packed, x, buf.ff, norm_weight=layer.ffn_norm, eps=eps)
        else:
            layer.w_gate.gemv(x, buf.gate, norm_weight=layer.ffn_norm, eps=eps)
            layer.w_up.gemv(x, buf.up, norm_weight=layer.ffn_norm, eps=eps)
            torch.mul(F.silu(buf.gate), buf.up, out=buf.ff)
        layer.w_down.gemv(buf.ff, x, residual=x)
    out = w.output
    if not (out.packed is not None and out.bias is None
            and gemv_argmax(out.packed, x, buf.logits, next_tok, buf.argmax_ws, norm_weight=w.output_norm, eps=eps)):
        out.gemv(x, buf.logits, norm_weight=w.output_norm, eps=eps)
        torch.argmax(buf.logits, dim=0, keepdim=True, out=next_tok)
    torch.add(pos, 1, out=next_pos)


class DecodeGraphs:
    """The decode step of one sequence (its cache layers), captured twice: graph 0 reads
    ``tok[0], pos[0]`` and writes ``tok[1], pos[1]``; graph 1 the reverse."""

    def __init__(self, cfg: ModelConfig, w: CudaWeights, rope: Rope, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, use_graphs: bool = True):
        device = k_cache.device
        self.buf = DecodeBuffers(cfg, k_cache.shape[2], device)
        self.tok = torch.zeros(2, dtype=torch.long, device=device)
        self.pos = torch.zeros(2, dtype=torch.int32, device=device)
        self.history = torch.zeros(k_cache.shape[2] + 1, dtype=torch.long, device=device)  # [p + 1] = argmax at p
        self._args = (cfg, w, rope, self.buf, k_cache, v_cache)
        self.use_graphs = use_graphs
        self.graphs: list[torch.cuda.CUDAGraph] = []

    def _run(self, i: int) -> None:
        """The step from slot i's (token, position) to slot 1 - i's; the greedy token is
        also kept in ``history`` at its position."""
        j = 1 - i
        decode_step(*self._args, self.tok[i:i + 1], self.pos[i:i + 1], self.tok[j:j + 1], self.pos[j:j + 1])
        self.history.index_copy_(0, self.pos[j:j + 1].long(), self.tok[j:j + 1])

    def _capture(self) -> None:
        """Warm up on the current inputs of graph 0 (compiling every kernel; it writes
        exactly what the coming step writes), then capture both graphs (graph 1 uses
        the same kernels, so it needs no warm-up of its own)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run(0)
        torch.cuda.current_stream().wait_stream(stream)
        for i in (0, 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._run(i)
            self.graphs.append(g)

    def step(self, i: int = 0) -> None:
        """Run graph ``i`` (capturing both on first use)."""
        if not self.use_graphs:
            self._run(i)
            return
        if not self.graphs:
            self._capture()
        self.graphs[i].replay()
