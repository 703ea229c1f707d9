"""The many-token forward pass on CUDA (prefill, batched steps, ``logits``): the same
computation as :class:`gguflm.model.layers.Transformer`, with each weight dequantized
into the half-precision workspace right before its tensor-core matmul, float16
activations into the matmuls, a float32 residual stream, and PyTorch's SDPA (flash
attention for a plain causal prefill) over a float16 KV cache.

Shapes: B rows, T tokens, S attended positions, E width, H/Hkv heads, D head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gguflm.engine.kv_cache import KVCache
from gguflm.model.config import ModelConfig
from gguflm.model.cuda.weights import HALF, CudaLayer, CudaWeights, Workspace
from gguflm.model.layers import Rope

OUTPUT_ROW_CHUNK = 8192  # rows of the output projection dequantized per matmul


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 ``x / sqrt(mean(x^2) + eps) * w`` over the last dim."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _attention(cfg: ModelConfig, layer: CudaLayer, h: torch.Tensor, rope: Rope, positions: torch.Tensor,
               mask: torch.Tensor | None, cache: KVCache, index: int, slots: torch.Tensor,
               ws: Workspace) -> torch.Tensor:
    # h: float16 [B, T, E] -> float32 [B, T, E]
    B, T, E = h.shape
    H, Hkv, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    flat = h.reshape(B * T, E)
    if layer.wqkv is not None:
        q, k, v = layer.wqkv.matmul(flat, ws).split((H * D, Hkv * D, Hkv * D), dim=-1)
    else:
        q, k, v = (lin.matmul(flat, ws) for lin in (layer.wq, layer.wk, layer.wv))
    rope_pos = positions.clamp(min=0)
    q = rope(q.float().view(B, T, H, D).transpose(1, 2), rope_pos).to(HALF)         # [B, H, T, D]
    k = rope(k.float().view(B, T, Hkv, D).transpose(1, 2), rope_pos).to(HALF)       # [B, Hkv, T, D]
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    keys, values = cache.update(index, slots, positions, k, v)                      # [B, Hkv, S, D]
    if H != Hkv:
        keys = keys.repeat_interleave(H // Hkv, dim=1)
        values = values.repeat_interleave(H // Hkv, dim=1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                         scale=D ** -0.5)                               # [B, H, T, D]
    return layer.wo.matmul(out.transpose(1, 2).reshape(B * T, H * D), ws).float().view(B, T, E)


def _feed_forward(layer: CudaLayer, h: torch.Tensor, ws: Workspace) -> torch.Tensor:
    # h: float16 [N, E] -> float32 [N, E]
    g = layer.w_gate.matmul(h, ws).float()
    u = layer.w_up.matmul(h, ws).float()
    return layer.w_down.matmul((F.silu(g) * u).to(HALF), ws).float()


@torch.inference_mode()
def forward_tokens(cfg: ModelConfig, w: CudaWeights, rope: Rope, ws: Workspace, tokens: torch.Tensor,
                   positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                   last_only: bool = False) -> torch.Tensor:
    """Logits of ``tokens`` [B, T] at ``positions`` [B, T] (< 0: right padding) for cache
    ``slots`` [B]: float32 [B, T, n_vocab], or [B, n_vocab] for each row's last token."""
    B, T = tokens.shape
    x = w.token_embd.rows(tokens.clamp(min=0).reshape(-1)).view(B, T, cfg.n_embd)   # [B, T, E]
    plain = B == 1 and int(positions[0, 0]) == 0 and bool((positions[0] == torch.arange(T, device=positions.device)).all())
    mask = None
    if not plain:  # padding or a continued sequence: an explicit causal mask over S positions
        q_pos = positions.clamp(min=0)
        key_pos = torch.arange(int(positions.max()) + 1, device=positions.device)
        mask = (key_pos[None, None, :] <= q_pos[:, :, None])[:, None]                 # [B, 1, T, S]
    for index, layer in enumerate(w.layers):
        h = rms_norm(x, layer.attn_norm, cfg.rms_eps).to(HALF)
        x = x + _attention(cfg, layer, h, rope, positions, mask, cache, index, slots, ws)
        h = rms_norm(x, layer.ffn_norm, cfg.rms_eps).to(HALF).view(B * T, cfg.n_embd)
        x = x + _feed_forward(layer, h, ws).view(B, T, cfg.n_embd)
    if last_only:
        last = (positions >= 0).sum(1) - 1                                             # [B]
        x = x[torch.arange(B, device=x.device), last][:, None]                         # [B, 1, E]
    h = rms_norm(x, w.output_norm, cfg.rms_eps).to(HALF)
    logits = w.output.matmul(h.view(-1, cfg.n_embd), ws, row_chunk=OUTPUT_ROW_CHUNK).float()
    return logits.view(B, cfg.n_vocab) if last_only else logits.view(B, T, cfg.n_vocab)
