"""The CUDA path: the decoder of :mod:`gguflm.model.decoder` (the block's composition,
written once for every device) over CUDA providers of its ops, between the embedding and
the output head (the architecture's choices from its ArchSpec: q/k norms, post norms,
local layers via the weights; activation, embedding scale, window, soft-cap via the config)::

    x  = embed(tokens) (* sqrt(E));  decoder(layers, ops, attention)
    logits = softcap(Wout output_norm(x))

Two providers of the ops, one per activation shape (both run every architecture):

* :class:`Rows` (here): N rows [N, E] (a prefill, the server's batched step): float16
  activations into the fused dequantize x GEMM on the tensor cores (batch invariant;
  gate and up in one launch), a float32 residual stream, each residual add deferred and
  fused with the RMSNorm that reads it.
* :class:`~gguflm.model.cuda.decode.Token`: one row, float32, through the fused GEMVs
  (RMSNorm in their prologue, the residual add in their epilogue).

Attention is the one op whose kernels depend on the shape of the step: one sequence from
``p0`` with no padding (:func:`attention_plain`: RoPE + cache write in one kernel, then
SDPA, a causal or sliding-window mask), padded rows (:func:`attention_general`), one token
per row (the split decode kernel, :mod:`.decode` and :mod:`.batched`). CUDA-graph capture
(of a prefill, a decode step, a batched step) runs these same functions.

Shapes: B rows, T tokens, N = B*T, S attended positions, E width, H/Hkv heads, D head size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gguflm.errors import GGUFError
from gguflm.kernels.triton.activations import add_rms_norm_half, gated_act, head_rms_norm_, rms_norm_half, rope_prefill
from gguflm.model.arch import Activation, RopeStyle
from gguflm.model.config import ModelConfig
from gguflm.model.cuda.weights import (HALF, OUTPUT_ROW_CHUNK, CudaLayer, CudaLinear, CudaWeights, gated_matmul,
                                       one_sequence, qkv_matmul)
from gguflm.model.decoder import Attention, decoder
from gguflm.model.kv_cache import KVCache
from gguflm.model.layers import Rope

_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# a prompt read from position 0 is padded to the first of these lengths that holds it and
# runs that length's captured graph (CudaModel: captured on the length's first prompt)
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)


def prefill_bucket(T: int, room: int) -> int | None:
    """The padded length of a T-token prompt read from position 0 into a slot of ``room``
    positions (the first of :data:`PREFILL_BUCKETS` that holds it), or None (run as is)."""
    return next((b for b in PREFILL_BUCKETS if T <= b <= room), None)


def cuda_unsupported(cfg: ModelConfig) -> str | None:
    """Why the fused CUDA kernels cannot compute this model, or None: the attention and
    RoPE kernels need a power-of-two head size."""
    D = cfg.head_dim
    if D & (D - 1) or not 16 <= D <= 256:
        return f"head size {D}: the Triton attention kernels need a power of two in [16, 256]"
    return None


def check_supported(cfg: ModelConfig) -> None:
    """Refuse, at load of the fused path, what its kernels cannot compute (instead of
    computing something else). ``load_model`` asks :func:`cuda_unsupported` first and
    runs such a model through the generic torch block on the GPU instead."""
    why = cuda_unsupported(cfg)
    if why:
        raise GGUFError(f"{cfg.arch}: {why}; the fused CUDA path cannot run it")


def embd_scale(cfg: ModelConfig) -> float | None:
    """Gemma's sqrt(n_embd) (ggml_scale in float32), else None."""
    return float(np.sqrt(np.float32(cfg.n_embd))) if cfg.spec.embd_scale else None


def softcap_(cfg: ModelConfig, logits: torch.Tensor) -> torch.Tensor:
    """logits = c tanh(logits / c) in place when the arch has a final soft-cap c."""
    if cfg.final_softcap:
        logits.div_(cfg.final_softcap).tanh_().mul_(cfg.final_softcap)
    return logits


def rope_tables(rope: Rope, layer: CudaLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos/sin tables [n_ctx, D/2] of a layer (local layers have their own base)."""
    return (rope.cos_swa, rope.sin_swa) if layer.local else (rope.cos, rope.sin)


class HeadNorm:
    """``head_norm`` of both CUDA providers: qkv [N, (H + 2 Hkv) D] normed in place."""

    cfg: ModelConfig

    def head_norm(self, qkv: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor) -> torch.Tensor:
        head_rms_norm_(qkv, q_norm, k_norm, self.cfg.n_head, self.cfg.n_head_kv, self.cfg.rms_eps)
        return qkv


class Rows(HeadNorm):
    """The ops of :mod:`gguflm.model.decoder` over N rows: ``x`` float32 [N, E] (the
    residual stream), float16 into the matmuls; qkv float16 [N, (H + 2 Hkv) D].
    ``linear_add`` keeps its result pending; the next ``normed`` adds it and norms in one
    kernel (:func:`add_rms_norm_half`), ``flush`` adds it alone."""

    def __init__(self, cfg: ModelConfig, w: CudaWeights, tokens: torch.Tensor):
        self.cfg, self.w, self.ws = cfg, w, w.workspace
        self.x = w.token_embd.rows(tokens)                                           # float32 [N, E]
        if (scale := embd_scale(cfg)) is not None:
            self.x *= scale
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.gelu = cfg.spec.activation is Activation.GELU_TANH

    def normed(self, weight: torch.Tensor) -> torch.Tensor:
        """float16 RMSNorm(x) * weight [N, E], the pending residual added first."""
        if self._pending is None:
            return rms_norm_half(self.x, weight, self.cfg.rms_eps)
        (r, post), self._pending = self._pending, None
        return add_rms_norm_half(self.x, r, weight, self.cfg.rms_eps, post=post)

    def flush(self) -> torch.Tensor:
        if self._pending is not None:
            (r, post), self._pending = self._pending, None
            add_rms_norm_half(self.x, r, None, self.cfg.rms_eps, post=post)
        return self.x

    def norm_linear(self, weight: torch.Tensor, lins: tuple[CudaLinear, ...]) -> torch.Tensor:
        return qkv_matmul(lins, self.normed(weight), self.ws)                        # h: float16 [N, E]

    def linear_add(self, a: torch.Tensor, lin: CudaLinear, post: torch.Tensor | None) -> None:
        """x += W a, or x += RMSNorm(W a) * post (pending until the next norm)."""
        self.flush()
        self._pending = (lin.matmul(a, self.ws), post)

    def norm_gated(self, layer: CudaLayer) -> torch.Tensor:
        # float16 [N, F] = act(h Wg^T) * (h Wu^T), h = RMSNorm(x) * ffn_norm
        h = self.normed(layer.ffn_norm)
        y = gated_matmul(layer.w_gate, layer.w_up, h, layer.gate_up_packed, self.gelu)   # one fused GEMM
        return y if y is not None else gated_act(layer.w_gate.matmul(h, self.ws), layer.w_up.matmul(h, self.ws),
                                                 self.gelu)

    def logits(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [N, n_vocab] of ``x`` (default: the stream); one row through the GEMV."""
        cfg, w = self.cfg, self.w
        x = self.flush() if x is None else x
        if x.shape[0] == 1:
            out = torch.empty(1, cfg.n_vocab, dtype=torch.float32, device=x.device)
            w.output.gemv(x[0], out[0], norm_weight=w.output_norm, eps=cfg.rms_eps)
        else:
            out = w.output.matmul(rms_norm_half(x, w.output_norm, cfg.rms_eps), self.ws,
                                  row_chunk=OUTPUT_ROW_CHUNK).float()
        return softcap_(cfg, out)


def _expand_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=-3)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    with sdpa_kernel(_BACKENDS):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale)


def plain_masks(cfg: ModelConfig, p0: int, T: int, device: torch.device) -> tuple:
    """Masks [T, S] (True: attend) of T tokens from p0 over S = p0 + T positions, for
    global and local layers; None where SDPA's own causal mask (p0 = 0) is the mask."""
    S = p0 + T
    q_pos, k_pos = torch.arange(p0, S, device=device)[:, None], torch.arange(S, device=device)[None, :]
    causal = None if p0 == 0 else k_pos <= q_pos
    local = causal
    if cfg.n_swa and S - 1 >= cfg.n_swa:  # llama.cpp's is_masked_swa: p1 - p0 >= n_swa is masked
        local = (k_pos <= q_pos) & (q_pos - k_pos < cfg.n_swa)
    return causal, local


def attention_plain(cfg: ModelConfig, rope: Rope, p0: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    masks: tuple) -> Attention:
    """Attention of T tokens of one sequence at positions p0 .. p0+T-1; k_cache/v_cache:
    [n_layer, Hkv, n_ctx, D] of its slot."""
    H, Hkv, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    neox = cfg.rope_style is RopeStyle.NEOX

    def attend(i: int, layer: CudaLayer, qkv: torch.Tensor) -> torch.Tensor:
        T = qkv.shape[0]
        cos, sin = rope_tables(rope, layer)
        q = rope_prefill(qkv, cos, sin, p0, k_cache[i], v_cache[i], H, neox)                 # [T, H, D]
        keys = _expand_kv(k_cache[i, :, :p0 + T], H // Hkv)[None]                          # [1, H, S, D]
        values = _expand_kv(v_cache[i, :, :p0 + T], H // Hkv)[None]
        out = _attend(q.transpose(0, 1)[None], keys, values, masks[layer.local], cfg.scale)  # [1, H, T, D]
        return out[0].transpose(0, 1).reshape(T, H * D)

    return attend


def attention_general(cfg: ModelConfig, rope: Rope, positions: torch.Tensor, cache: KVCache,
                      slots: torch.Tensor) -> Attention:
    """Attention of B rows of T tokens (right padding: position < 0)."""
    B, T = positions.shape
    H, Hkv, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    rope_pos = positions.clamp(min=0)
    key_pos = torch.arange(int(positions.max()) + 1, device=positions.device)
    seen = key_pos[None, None, :] <= rope_pos[:, :, None]                                 # [B, T, S]
    masks = (seen[:, None], seen[:, None])
    if cfg.n_swa:
        masks = (masks[0], (seen & (rope_pos[:, :, None] - key_pos[None, None, :] < cfg.n_swa))[:, None])

    def attend(i: int, layer: CudaLayer, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
        q = rope(q.float().view(B, T, H, D).transpose(1, 2), rope_pos, layer.local).to(HALF)      # [B, H, T, D]
        k = rope(k.float().view(B, T, Hkv, D).transpose(1, 2), rope_pos, layer.local).to(HALF)    # [B, Hkv, T, D]
        keys, values = cache.update(i, slots, positions, k, v.view(B, T, Hkv, D).transpose(1, 2))  # [B, Hkv, S, D]
        out = _attend(q, _expand_kv(keys, H // Hkv), _expand_kv(values, H // Hkv), masks[layer.local], cfg.scale)
        return out.transpose(1, 2).reshape(B * T, H * D)

    return attend


def plain_start(positions: torch.Tensor) -> int | None:
    """p0 when ``positions`` [1, T] is p0, p0+1, ..., p0+T-1 (one sequence, no padding),
    else None. Reads the positions on the host (one sync)."""
    pos = positions.cpu()
    p0 = int(pos[0, 0])
    if pos.shape[0] == 1 and p0 >= 0 and bool((pos[0] == torch.arange(p0, p0 + pos.shape[1])).all()):
        return p0
    return None


@torch.inference_mode()
def forward_plain(cfg: ModelConfig, w: CudaWeights, rope: Rope, tokens: torch.Tensor, p0: int,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, last_only: bool,
                  last: torch.Tensor | None = None) -> torch.Tensor:
    """One sequence: ``tokens`` [T] at positions p0 .. p0+T-1 into the cache layers
    ``k_cache``/``v_cache`` [n_layer, Hkv, n_ctx, D] of its slot. No host sync (it can be
    captured in a CUDA graph). -> float32 [1, n_vocab] (last_only: of the last row, or of
    row ``last`` (Long [1], on the device) of a padded run) or [1, T, n_vocab]."""
    T = tokens.shape[0]
    with one_sequence():          # the unsplit fused GEMM, cuBLAS from 64 rows (see weights.one_sequence)
        ops = Rows(cfg, w, tokens)
        decoder(w.layers, ops, attention_plain(cfg, rope, p0, k_cache, v_cache, plain_masks(cfg, p0, T, tokens.device)))
        x = ops.flush()
        if last_only:
            return ops.logits(x[-1:] if last is None else x.index_select(0, last))
        return ops.logits(x).view(1, T, cfg.n_vocab)


@torch.inference_mode()
def forward_tokens(cfg: ModelConfig, w: CudaWeights, rope: Rope, tokens: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache, slots: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """Logits of ``tokens`` [B, T] at ``positions`` [B, T] (< 0: right padding) for cache
    ``slots`` [B]: float32 [B, T, n_vocab], or [B, n_vocab] for each row's last token."""
    B, T = tokens.shape
    ops = Rows(cfg, w, tokens.clamp(min=0).reshape(-1))
    decoder(w.layers, ops, attention_general(cfg, rope, positions, cache, slots))
    x = ops.flush().view(B, T, cfg.n_embd)
    if last_only:
        last = (positions >= 0).sum(1) - 1                                              # [B]
        x = x[torch.arange(B, device=x.device), last]                                   # [B, E]
        return torch.cat([ops.logits(x[b:b + 1]) for b in range(B)])                    # [B, n_vocab]
    return ops.logits(x.reshape(B * T, cfg.n_embd)).view(B, T, cfg.n_vocab)
