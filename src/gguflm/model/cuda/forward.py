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

from gguflm.engine.kv_cache import KVCache
from gguflm.model.arch import RopeStyle
from gguflm.model.config import ModelConfig
from gguflm.model.cuda.weights import HALF, CudaLayer, CudaWeights, Workspace
from gguflm.model.layers import Rope
from gguflm.quant.triton.activations import rms_norm_half, rope_prefill, silu_mul_half
from gguflm.quant.triton.dequant import dequantize_into

OUTPUT_ROW_CHUNK = 8192  # rows of the output projection dequantized per matmul
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _qkv(layer: CudaLayer, h: torch.Tensor, ws: Workspace) -> torch.Tensor:
    # h: float16 [N, E] -> float16 [N, (H + 2 Hkv) D]
    if len(layer.qkv) == 1:
        return layer.qkv[0].matmul(h, ws)
    return torch.cat([lin.matmul(h, ws) for lin in layer.qkv], dim=-1)


def _swiglu(layer: CudaLayer, h: torch.Tensor, ws: Workspace) -> torch.Tensor:
    # h: float16 [N, E] -> float16 [N, F] = silu(h Wg^T) * (h Wu^T), gate and up in one matmul
    g, u = layer.w_gate, layer.w_up
    if layer.swiglu_fused:
        w = ws.view(2 * g.n_out, g.n_in)
        dequantize_into(g.packed, w[:g.n_out])
        dequantize_into(u.packed, w[g.n_out:])
        gu = F.linear(h, w)
    else:
        gu = torch.cat((g.matmul(h, ws), u.matmul(h, ws)), dim=-1)
    return silu_mul_half(gu)


def _expand_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=-3)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
            causal: bool, scale: float) -> torch.Tensor:
    with sdpa_kernel(_BACKENDS):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=scale)


def _layer_plain(cfg: ModelConfig, layer: CudaLayer, x: torch.Tensor, rope: Rope, p0: int,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, ws: Workspace) -> None:
    """One block for T tokens of one sequence at positions p0 .. p0+T-1, x float32 [T, E]
    updated in place; k_cache/v_cache: [Hkv, n_ctx, D] of its slot."""
    T = x.shape[0]
    H, Hkv, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    h = rms_norm_half(x, layer.attn_norm, cfg.rms_eps)
    q = rope_prefill(_qkv(layer, h, ws), rope.cos, rope.sin, p0, k_cache, v_cache, H,
                     cfg.rope_style is RopeStyle.NEOX)                               # [T, H, D]
    S = p0 + T
    keys = _expand_kv(k_cache[:, :S], H // Hkv)[None]                                  # [1, H, S, D]
    values = _expand_kv(v_cache[:, :S], H // Hkv)[None]
    mask = None
    if p0:  # query t sees keys 0 .. p0 + t
        mask = torch.arange(S, device=x.device)[None, :] <= torch.arange(p0, S, device=x.device)[:, None]
    out = _attend(q.transpose(0, 1)[None], keys, values, mask, p0 == 0, D ** -0.5)     # [1, H, T, D]
    x += layer.wo.matmul(out[0].transpose(0, 1).reshape(T, H * D), ws)
    h = rms_norm_half(x, layer.ffn_norm, cfg.rms_eps)
    x += layer.w_down.matmul(_swiglu(layer, h, ws), ws)


def _layer_general(cfg: ModelConfig, layer: CudaLayer, x: torch.Tensor, rope: Rope, positions: torch.Tensor,
                   mask: torch.Tensor, cache: KVCache, index: int, slots: torch.Tensor, ws: Workspace) -> None:
    """One block for B rows (right padding: position < 0), x float32 [B, T, E] in place."""
    B, T, E = x.shape
    H, Hkv, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    h = rms_norm_half(x.view(B * T, E), layer.attn_norm, cfg.rms_eps)
    q, k, v = _qkv(layer, h, ws).split((H * D, Hkv * D, Hkv * D), dim=-1)
    rope_pos = positions.clamp(min=0)
    q = rope(q.float().view(B, T, H, D).transpose(1, 2), rope_pos).to(HALF)              # [B, H, T, D]
    k = rope(k.float().view(B, T, Hkv, D).transpose(1, 2), rope_pos).to(HALF)            # [B, Hkv, T, D]
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    keys, values = cache.update(index, slots, positions, k, v)                           # [B, Hkv, S, D]
    out = _attend(q, _expand_kv(keys, H // Hkv), _expand_kv(values, H // Hkv), mask, False, D ** -0.5)
    x += layer.wo.matmul(out.transpose(1, 2).reshape(B * T, H * D), ws).view(B, T, E)
    h = rms_norm_half(x.view(B * T, E), layer.ffn_norm, cfg.rms_eps)
    x += layer.w_down.matmul(_swiglu(layer, h, ws), ws).view(B, T, E)


def _logits(cfg: ModelConfig, w: CudaWeights, x: torch.Tensor, ws: Workspace) -> torch.Tensor:
    # x: float32 [N, E] -> float32 [N, n_vocab]; one row through the fused GEMV
    if x.shape[0] == 1:
        out = torch.empty(cfg.n_vocab, dtype=torch.float32, device=x.device)
        return w.output.gemv(x[0], out, norm_weight=w.output_norm, eps=cfg.rms_eps)[None]
    h = rms_norm_half(x, w.output_norm, cfg.rms_eps)
    return w.output.matmul(h, ws, row_chunk=OUTPUT_ROW_CHUNK).float()


@torch.inference_mode()
def forward_tokens(cfg: ModelConfig, w: CudaWeights, rope: Rope, ws: Workspace, tokens: torch.Tensor,
                   positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                   last_only: bool = False) -> torch.Tensor:
    """Logits of ``tokens`` [B, T] at ``positions`` [B, T] (< 0: right padding) for cache
    ``slots`` [B]: float32 [B, T, n_vocab], or [B, n_vocab] for each row's last token."""
    B, T = tokens.shape
    pos = positions.cpu()                                                               # the one host sync
    p0 = int(pos[0, 0])
    plain = B == 1 and p0 >= 0 and bool((pos[0] == torch.arange(p0, p0 + T)).all())
    x = w.token_embd.rows(tokens.clamp(min=0).reshape(-1))                             # float32 [N, E]
    if plain:
        slot = int(slots[0])
        for index, layer in enumerate(w.layers):
            _layer_plain(cfg, layer, x, rope, p0, cache.k[index, slot], cache.v[index, slot], ws)
        if last_only:
            return _logits(cfg, w, x[-1:], ws)                                          # [1, n_vocab]
        return _logits(cfg, w, x, ws).view(1, T, cfg.n_vocab)
    x = x.view(B, T, cfg.n_embd)
    q_pos = positions.clamp(min=0)
    key_pos = torch.arange(int(pos.max()) + 1, device=positions.device)
    mask = (key_pos[None, None, :] <= q_pos[:, :, None])[:, None]                        # [B, 1, T, S]
    for index, layer in enumerate(w.layers):
        _layer_general(cfg, layer, x, rope, positions, mask, cache, index, slots, ws)
    if last_only:
        last = (positions >= 0).sum(1) - 1                                              # [B]
        x = x[torch.arange(B, device=x.device), last]                                   # [B, E]
        return torch.cat([_logits(cfg, w, x[b:b + 1], ws) for b in range(B)])           # [B, n_vocab]
    return _logits(cfg, w, x.reshape(B * T, cfg.n_embd), ws).view(B, T, cfg.n_vocab)
