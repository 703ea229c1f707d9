"""The batch-1 decode step: :func:`gguflm.model.decoder.decoder` over one row with the ops of
:class:`Token` (static buffers; Wqkv RMSNorm(x) in one GEMV launch, RoPE + cache write +
attention split over positions in the decode kernel, x += Wo a and x += Wd f with the
residual in the GEMV epilogue, SwiGLU as one GEMV over both weights), then
``logits = Wout RMSNorm(x)`` and the greedy ``next = argmax(logits)``, captured once in a
CUDA graph and replayed for every token. Nothing reads the host: the token and the
position are device buffers, so a replay needs no arguments. Two graphs that hand each other their inputs (``(tok, pos)`` ->
``(next, pos + 1)`` and back) let greedy decoding run back to back with no launch or
copy in between.
"""

from __future__ import annotations

import torch

from gguflm.kernels.triton.activations import add_rms_norm_half, gated_act
from gguflm.kernels.triton.attention import AttentionWorkspace, decode_attention
from gguflm.model.arch import Activation, RopeStyle
from gguflm.model.config import ModelConfig
from gguflm.model.cuda.forward import HeadNorm, embd_scale, rope_tables, softcap_
from gguflm.model.cuda.weights import CudaLayer, CudaLinear, CudaWeights
from gguflm.model.decoder import decoder
from gguflm.model.layers import Rope
from gguflm.quant.cuda import timing
from gguflm.quant.cuda.gemv import ArgmaxWorkspace, gemv_argmax, gemv_multi, gemv_swiglu


def attention_splits(n_ctx: int) -> int:
    """Position ranges of the split attention: about 128 positions each, 1..32 (a power of two)."""
    n = 1
    while n < 32 and n * 128 < n_ctx:
        n *= 2
    return n


class DecodeRows(HeadNorm):
    """The ops of :mod:`gguflm.model.decoder` for one token of each of R sequences: static
    float32 buffers [R, ...] (``n_rows=None``: one row, buffers without the row axis, as
    :class:`Token` keeps them), fused GEMVs (the RMSNorm in the prologue, the residual add in
    the epilogue, SwiGLU and QKV in one launch each). The GEMVs take x [R, K] with row r
    bit-identical to the one-row call on x[r] (:func:`gguflm.quant.cuda.gemv.gemv` and
    kin), so a row computes the same bits at any R, beside any other rows, and as the batch-1
    decode step: the decode rows of the server's batched step (:mod:`.batched` with
    ``GGUFLM_CUDA_DECODE_ROWS=gemv``). ``x`` is the residual stream; ``embed`` fills it."""

    def __init__(self, cfg: ModelConfig, w: CudaWeights, n_rows: int | None, device: torch.device):
        H, Hkv, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        lead = () if n_rows is None else (n_rows,)
        f32 = dict(dtype=torch.float32, device=device)
        self.cfg, self.w, self.eps, self.n_rows = cfg, w, cfg.rms_eps, n_rows
        self.gelu = cfg.spec.activation is Activation.GELU_TANH
        self.x = torch.empty(*lead, cfg.n_embd, **f32)
        self.tmp = torch.empty(*lead, cfg.n_embd, **f32)       # a block output before its post norm
        self.qkv = torch.empty(*lead, (H + 2 * Hkv) * D, **f32)
        self.attn = torch.empty(*lead, H, D, **f32)
        self.gate = torch.empty(*lead, cfg.n_ff, **f32)
        self.up = torch.empty(*lead, cfg.n_ff, **f32)
        self.ff = torch.empty(*lead, cfg.n_ff, **f32)

    def embed(self, tok: torch.Tensor) -> None:
        self.w.token_embd.rows(tok, out=self.x.view(-1, self.cfg.n_embd))
        if (scale := embd_scale(self.cfg)) is not None:
            self.x.mul_(scale)

    def norm_linear(self, weight: torch.Tensor, lins: tuple[CudaLinear, ...]) -> torch.Tensor:
        """The QKV projection of RMSNorm(x) * weight into ``qkv``: one launch for the
        stacked [Wq; Wk; Wv] or the three of different types as segments."""
        x = self.x
        outs = self.qkv.split([lin.n_out for lin in lins], dim=-1)
        if all(lin.packed is not None and lin.bias is None for lin in lins):
            gemv_multi([lin.packed for lin in lins], x, outs, norm_weight=weight, eps=self.eps)
        else:
            for lin, o in zip(lins, outs):
                lin.gemv(x, o, norm_weight=weight, eps=self.eps)
        return self.qkv

    def linear_add(self, a: torch.Tensor, lin: CudaLinear, post: torch.Tensor | None) -> None:
        """x += W a (the residual in the GEMV's epilogue), or x += RMSNorm(W a) * post."""
        a = a.reshape(*self.x.shape[:-1], -1)
        if post is None:
            lin.gemv(a, self.x, residual=self.x)
        else:
            lin.gemv(a, self.tmp)
            E = self.cfg.n_embd
            add_rms_norm_half(self.x.view(-1, E), self.tmp.view(-1, E), None, self.eps, post=post)

    def norm_gated(self, layer: CudaLayer) -> torch.Tensor:
        """ff = act(Wg h) * (Wu h), h = RMSNorm(x) * ffn_norm."""
        x, g, u, nw = self.x, layer.w_gate, layer.w_up, layer.ffn_norm
        if layer.gate_up_packed and not self.gelu:
            gemv_swiglu(g.packed, u.packed, x, self.ff, norm_weight=nw, eps=self.eps)
            return self.ff
        if layer.gate_up_packed:
            gemv_multi([g.packed, u.packed], x, [self.gate, self.up], norm_weight=nw, eps=self.eps)
        else:
            g.gemv(x, self.gate, norm_weight=nw, eps=self.eps)
            u.gemv(x, self.up, norm_weight=nw, eps=self.eps)
        return gated_act(self.gate, self.up, self.gelu, out=self.ff)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """out float32 [R, n_vocab] (any row stride) = softcap(Wout RMSNorm(x))."""
        self.w.output.gemv(self.x, out, norm_weight=self.w.output_norm, eps=self.eps)
        return softcap_(self.cfg, out)


class Token(DecodeRows):
    """The ops of :class:`DecodeRows` for the batch-1 decode step (one row, buffers without
    the row axis), with the logits buffer and the greedy argmax in the output GEMV's epilogue."""

    def __init__(self, cfg: ModelConfig, w: CudaWeights, n_ctx: int, device: torch.device):
        super().__init__(cfg, w, None, device)
        self.logits_buf = torch.empty(cfg.n_vocab, dtype=torch.float32, device=device)   # the step's logits
        self.attn_ws = AttentionWorkspace(cfg.n_head, cfg.head_dim, attention_splits(n_ctx), device)
        self.argmax_ws = ArgmaxWorkspace(device)

    def logits_argmax(self, next_tok: torch.Tensor) -> None:
        """logits = softcap(Wout RMSNorm(x)); next_tok = argmax (in the GEMV's epilogue
        where the kernel has one and there is no soft-cap)."""
        out, cfg = self.w.output, self.cfg
        if (out.packed is not None and out.bias is None and not cfg.final_softcap
                and gemv_argmax(out.packed, self.x, self.logits_buf, next_tok, self.argmax_ws,
                                norm_weight=self.w.output_norm, eps=self.eps)):
            return
        out.gemv(self.x, self.logits_buf, norm_weight=self.w.output_norm, eps=self.eps)
        softcap_(cfg, self.logits_buf)
        torch.argmax(self.logits_buf, dim=0, keepdim=True, out=next_tok)


def decode_step(cfg: ModelConfig, w: CudaWeights, rope: Rope, ops: Token,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                tok: torch.Tensor, pos: torch.Tensor, next_tok: torch.Tensor, next_pos: torch.Tensor) -> None:
    """One token: tok int64 [1], pos int32 [1] -> ops.logits_buf, next_tok = argmax,
    next_pos = pos + 1. k_cache/v_cache: [n_layer, Hkv, n_ctx, D] of one sequence."""
    neox = cfg.rope_style is RopeStyle.NEOX

    def attend(i: int, layer: CudaLayer, qkv: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_tables(rope, layer)
        return decode_attention(qkv, cos, sin, pos, k_cache[i], v_cache[i], ops.attn, ops.attn_ws, cfg.scale, neox,
                                window=cfg.n_swa if layer.local else 0)

    ops.embed(tok)
    decoder(w.layers, ops, attend)
    ops.logits_argmax(next_tok)
    torch.add(pos, 1, out=next_pos)


class DecodeGraphs:
    """The decode step of one sequence (its cache layers), captured twice: graph 0 reads
    ``tok[0], pos[0]`` and writes ``tok[1], pos[1]``; graph 1 the reverse."""

    def __init__(self, cfg: ModelConfig, w: CudaWeights, rope: Rope, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, use_graphs: bool = True):
        device = k_cache.device
        self.buf = Token(cfg, w, k_cache.shape[2], device)
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
            with timing.phase("decode step: warm-up run (compiles its kernels) + 2 graph captures"):
                self._capture()
            timing.settled()
        self.graphs[i].replay()
