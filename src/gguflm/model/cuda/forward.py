"""The many-token forward pass on CUDA (prefill, batched steps, ``logits``): the same
computation as :class:`gguflm.model.layers.Transformer`, with each weight dequantized
into the half-precision workspace right before its tensor-core matmul, float16
activations into the matmuls, a float32 residual stream, and PyTorch's SDPA (flash
attention) over a float16 KV cache.

One sequence filling its cache slot from position p0 with no padding (a prefill, or a
continued chat) takes the fused path: no host sync inside the layer loop, RMSNorm,
RoPE + cache write and SwiGLU as single kernels, gate and up as one matmul. Anything
else (several rows, padding) goes through the engine's KVCache.update with masks.

Shapes: B rows, T tokens, N = B*T, S attended positions, E width, H/Hkv heads, D head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gguflm.model.kv_cache import KVCache
from gguflm.model.arch import RopeStyle
from gguflm.model.config import ModelConfig
from gguflm.model.cuda.weights import HALF, OUTPUT_ROW_CHUNK, CudaLayer, CudaWeights, Workspace
from gguflm.model.layers import Rope
from gguflm.kernels.triton.activations import add_rms_norm_half, rms_norm_half, rope_prefill, silu_mul_half

_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _qkv(layer: CudaLayer, h: torch.Tensor, ws: Workspace) -> torch.Tensor:
    # h: float16 [N, E] -> float16 [N, (H + 2 Hkv) D]
    if len(layer.qkv) == 1:
        return layer.qkv[0].matmul(h, ws)
    return torch.cat([lin.matmul(h, ws) for lin in layer.qkv], dim=-1)


def _swiglu(layer: CudaLayer, h: torch.Tensor, ws: Workspace) -> torch.Tensor:
    # h: float16 [N, E] -> float16 [N, F] = silu(h Wg^T) * (h Wu^T)
    return silu_mul_half(layer.w_gate.matmul(h, ws), layer.w_up.matmul(h, ws))


def _expand_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=-3)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
            causal: bool, scale: float) -> torch.Tensor:
    with sdpa_kernel(_BACKENDS):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=scale)


def _attention_plain(cfg: ModelConfig, layer: CudaLayer, h: torch.Tensor, rope: Rope, p0: int,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """Attention of T tokens of one sequence at positions p0 .. p0+T-1: h float16 [T, E]
    -> float16 [T, E] (before the residual add); k_cache/v_cache: [Hkv, n_ctx, D] of its slot."""
    T = h.shape[0]
    H, Hkv, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    q = rope_prefill(_qkv(layer, h, ws), rope.cos, rope.sin, p0, k_cache, v_cache, H,
                     cfg.rope_style is RopeStyle.NEOX)                               # [T, H, D]
    S = p0 + T
    keys = _expand_kv(k_cache[:, :S], H // Hkv)[None]                                  # [1, H, S, D]
    values = _expand_kv(v_cache[:, :S], H // Hkv)[None]
    mask = None
    if p0:  # query t sees keys 0 .. p0 + t
        mask = torch.arange(S, device=h.device)[None, :] <= torch.arange(p0, S, device=h.device)[:, None]
    out = _attend(q.transpose(0, 1)[None], keys, values, mask, p0 == 0, D ** -0.5)     # [1, H, T, D]
    return layer.wo.matmul(out[0].transpose(0, 1).reshape(T, H * D), ws)


def _attention_general(cfg: ModelConfig, layer: CudaLayer, h: torch.Tensor, rope: Rope, positions: torch.Tensor,
                       mask: torch.Tensor, cache: KVCache, index: int, slots: torch.Tensor,
                       ws: Workspace) -> torch.Tensor:
    """Attention of B rows (right padding: position < 0): h float16 [B*T, E] -> float16 [B*T, E]."""
    B, T = positions.shape
    H, Hkv, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    q, k, v = _qkv(layer, h, ws).split((H * D, Hkv * D, Hkv * D), dim=-1)
    rope_pos = positions.clamp(min=0)
    q = rope(q.float().view(B, T, H, D).transpose(1, 2), rope_pos).to(HALF)              # [B, H, T, D]
    k = rope(k.float().view(B, T, Hkv, D).transpose(1, 2), rope_pos).to(HALF)            # [B, Hkv, T, D]
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    keys, values = cache.update(index, slots, positions, k, v)                           # [B, Hkv, S, D]
    out = _attend(q, _expand_kv(keys, H // Hkv), _expand_kv(values, H // Hkv), mask, False, D ** -0.5)
    return layer.wo.matmul(out.transpose(1, 2).reshape(B * T, H * D), ws)


def _blocks(cfg: ModelConfig, w: CudaWeights, x: torch.Tensor, attention) -> None:
    """All blocks over the float32 residual stream x [N, E] (in place); ``attention(layer,
    index, h)`` maps the normed float16 input to the attention output. Each residual add
    is fused with the RMSNorm that follows it."""
    eps = cfg.rms_eps
    h = rms_norm_half(x, w.layers[0].attn_norm, eps)
    for index, layer in enumerate(w.layers):
        h = add_rms_norm_half(x, attention(layer, index, h), layer.ffn_norm, eps)
        down = layer.w_down.matmul(_swiglu(layer, h, w.workspace), w.workspace)
        if index + 1 < len(w.layers):
            h = add_rms_norm_half(x, down, w.layers[index + 1].attn_norm, eps)
        else:
            x += down


def _logits(cfg: ModelConfig, w: CudaWeights, x: torch.Tensor, ws: Workspace) -> torch.Tensor:
    # x: float32 [N, E] -> float32 [N, n_vocab]; one row through the fused GEMV
    if x.shape[0] == 1:
        out = torch.empty(cfg.n_vocab, dtype=torch.float32, device=x.device)
        return w.output.gemv(x[0], out, norm_weight=w.output_norm, eps=cfg.rms_eps)[None]
    h = rms_norm_half(x, w.output_norm, cfg.rms_eps)
    return w.output.matmul(h, ws, row_chunk=OUTPUT_ROW_CHUNK).float()


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
                  k_cache: torch.Tensor, v_cache: torch.Tensor, last_only: bool) -> torch.Tensor:
    """One sequence: ``tokens`` [T] at positions p0 .. p0+T-1 into the cache layers
    ``k_cache``/``v_cache`` [n_layer, Hkv, n_ctx, D] of its slot. No host sync (it can be
    captured in a CUDA graph). -> float32 [1, n_vocab] (last_only) or [1, T, n_vocab]."""
    T = tokens.shape[0]
    x = w.token_embd.rows(tokens)                                                       # float32 [T, E]
    _blocks(cfg, w, x, lambda layer, i, h: _attention_plain(cfg, layer, h, rope, p0, k_cache[i], v_cache[i],
                                                            w.workspace))
    if last_only:
        return _logits(cfg, w, x[-1:], w.workspace)                                    # [1, n_vocab]
    return _logits(cfg, w, x, w.workspace).view(1, T, cfg.n_vocab)


@torch.inference_mode()
def forward_tokens(cfg: ModelConfig, w: CudaWeights, rope: Rope, tokens: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache, slots: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """Logits of ``tokens`` [B, T] at ``positions`` [B, T] (< 0: right padding) for cache
    ``slots`` [B]: float32 [B, T, n_vocab], or [B, n_vocab] for each row's last token."""
    B, T = tokens.shape
    p0 = plain_start(positions) if B == 1 else None
    if p0 is not None:
        slot = int(slots[0])
        return forward_plain(cfg, w, rope, tokens[0], p0, cache.k[:, slot], cache.v[:, slot], last_only)
    ws = w.workspace
    x = w.token_embd.rows(tokens.clamp(min=0).reshape(-1))                             # float32 [N, E]
    q_pos = positions.clamp(min=0)
    key_pos = torch.arange(int(positions.max()) + 1, device=positions.device)
    mask = (key_pos[None, None, :] <= q_pos[:, :, None])[:, None]                        # [B, 1, T, S]
    _blocks(cfg, w, x, lambda layer, i, h: _attention_general(cfg, layer, h, rope, positions, mask, cache, i,
                                                              slots, ws))
    x = x.view(B, T, cfg.n_embd)
    if last_only:
        last = (positions >= 0).sum(1) - 1                                              # [B]
        x = x[torch.arange(B, device=x.device), last]                                   # [B, E]
        return torch.cat([_logits(cfg, w, x[b:b + 1], ws) for b in range(B)])           # [B, n_vocab]
    return _logits(cfg, w, x.reshape(B * T, cfg.n_embd), ws).view(B, T, cfg.n_vocab)
