"""The decoder, written once: a block composed from the choices of the architecture's
:class:`~gguflm.model.arch.ArchSpec` (see arch.py), as llama.cpp's ``llm_build_*`` graphs
compute them::

    h   = x + post_attn_norm(attn(attn_norm(x)))        post norms: Gemma only
    out = h + post_ffn_norm(ffn(ffn_norm(h)))
    attn: q, k, v = Wq n, Wk n, Wv n (+ biases); q, k = rope(qk_norm(q)), rope(qk_norm(k));
          softmax(q k^T * scale + causal/sliding-window mask) v; Wo
    ffn:  Wd (act(Wg n) * Wu n), act = SiLU or GELU-tanh

Shapes: B batch rows, T new tokens per row, S cached positions a row attends to,
E = n_embd, H query heads, Hkv key/value heads, D head size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gguflm.model.arch import Activation, RopeStyle
from gguflm.model.kv_cache import KVCache
from gguflm.model.config import ModelConfig


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * w`` over the last dim (ggml_rms_norm then mul)."""

    op = "rms_norm"  # the op a fused provider must have to run this norm (kernels.cpu.block.NORMS)

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [E]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., E] -> [..., E]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_angles(n_ctx: int, n_rot: int, freq_base: float, freq_scale: float,
                freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 angles ``theta[p, i] = freq_scale * p * base^(-2i/n_rot) / ff[i]``, [n_ctx, n_rot/2].

    Computed as ggml's CPU rope does: ``theta_scale = powf(base, -2/n_rot)`` in float32 and
    the angle of pair ``i`` obtained from pair ``i-1`` by one float32 multiplication.
    """
    theta_scale = np.float32(np.power(np.float32(freq_base), np.float32(-2.0 / n_rot)))
    theta = np.arange(n_ctx, dtype=np.float32)                     # [n_ctx]
    out = np.empty((n_ctx, n_rot // 2), dtype=np.float32)
    for i in range(n_rot // 2):
        out[:, i] = theta
        theta = theta * theta_scale
    angles = torch.from_numpy(out)
    if freq_factors is not None:
        angles = angles / freq_factors.float()
    return angles * np.float32(freq_scale)


class Rope(nn.Module):
    """Rotary position embedding from precomputed cos/sin tables.

    NORM rotates adjacent pairs ``(x[2i], x[2i+1])`` by ``theta[p, i]``; NEOX rotates
    ``(x[i], x[i + D/2])``. ``mscale`` scales cos and sin (llama.cpp's attn_factor). Models
    with local (sliding-window) layers have a second table for those (``cos_swa``/``sin_swa``:
    ``rope.freq_base_swa``, unscaled), chosen with ``local=True``.
    """

    def __init__(self, cfg: ModelConfig, n_ctx: int, freq_factors: torch.Tensor | None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        theta = rope_angles(n_ctx, cfg.n_rot, cfg.rope_freq_base, cfg.rope_freq_scale, freq_factors)
        mscale = np.float32(cfg.rope_attn_factor)
        self.register_buffer("cos", (torch.cos(theta) * mscale).to(device), persistent=False)  # [n_ctx, D/2]
        self.register_buffer("sin", (torch.sin(theta) * mscale).to(device), persistent=False)
        if any(cfg.swa_layers):  # llama.cpp: rope_freq_base_train_swa, rope_freq_scale_train_swa = 1
            theta = rope_angles(n_ctx, cfg.n_rot, cfg.rope_freq_base_swa, 1.0, freq_factors)
            self.register_buffer("cos_swa", (torch.cos(theta) * mscale).to(device), persistent=False)
            self.register_buffer("sin_swa", (torch.sin(theta) * mscale).to(device), persistent=False)
        self.style = cfg.rope_style

    def forward(self, x: torch.Tensor, positions: torch.Tensor, local: bool = False) -> torch.Tensor:
        # x: [B, nh, T, D], positions: [B, T] (>= 0) -> [B, nh, T, D]
        cos = (self.cos_swa if local else self.cos)[positions][:, None]  # [B, 1, T, D/2]
        sin = (self.sin_swa if local else self.sin)[positions][:, None]
        if self.style is RopeStyle.NORM:
            x0, x1 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        half = x.shape[-1] // 2
        x0, x1 = x[..., :half], x[..., half:]
        return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)


class Attention(nn.Module):
    """Causal grouped-query self-attention over the KV cache; query head h reads KV head
    ``h // (H / Hkv)``; scores scaled by ``cfg.scale`` (1/sqrt(D) unless the arch says
    otherwise). ``q_norm``/``k_norm``: RMSNorm over each head before RoPE (Qwen3, Gemma 3);
    ``local``: this layer uses the sliding window (``window`` = cfg.n_swa keys, the mask the
    Transformer passes) and its own RoPE table."""

    def __init__(self, cfg: ModelConfig, wq: nn.Module, wk: nn.Module, wv: nn.Module, wo: nn.Module,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None, local: bool = False):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo
        self.q_norm, self.k_norm = q_norm, k_norm
        self.n_head, self.n_head_kv, self.head_dim = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        self.scale, self.local = cfg.scale, local
        self.window = cfg.n_swa if local else 0

    def forward(self, x: torch.Tensor, rope: Rope, positions: torch.Tensor, blocked: torch.Tensor,
                cache: KVCache, layer: int, slots: torch.Tensor) -> torch.Tensor:
        # x: [B, T, E]; positions: [B, T] (< 0 = padding);
        # blocked: Bool[B, 1, 1, T, S], True where a query may not see a key -> [B, T, E]
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)                      # [B, T, H, D]
        k = self.wk(x).view(B, T, self.n_head_kv, self.head_dim)                   # [B, T, Hkv, D]
        v = self.wv(x).view(B, T, self.n_head_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                                # [B, nh, T, D]
        rope_pos = positions.clamp(min=0)
        q, k = rope(q, rope_pos, self.local), rope(k, rope_pos, self.local)
        keys, values = cache.update(layer, slots, positions, k, v)                 # [B, Hkv, S, D]
        g = self.n_head // self.n_head_kv
        q = q.reshape(B, self.n_head_kv, g * T, self.head_dim)                     # heads of a KV group
        scores = (q @ keys.transpose(-1, -2)) * self.scale                         # [B, Hkv, g*T, S]
        scores = scores.view(B, self.n_head_kv, g, T, -1).masked_fill(blocked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(B, self.n_head_kv, g * T, -1)
        out = (probs @ values).view(B, self.n_head, T, self.head_dim)             # [B, H, T, D]
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


_ACTIVATIONS = {
    Activation.SILU: F.silu,
    Activation.GELU_TANH: lambda g: F.gelu(g, approximate="tanh"),
}


class FeedForward(nn.Module):
    """Gated FFN: ``down(act(gate(x)) * up(x))``, act SiLU (SwiGLU) or GELU-tanh (GeGLU)."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, activation: Activation = Activation.SILU):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down
        self.activation = activation
        self._act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., E] -> [..., E]
        return self.down(self._act(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Decoder block: ``h = x + post1(attn(norm1(x)))``; ``out = h + post2(ffn(norm2(h)))``,
    the post norms present only where the arch has them (Gemma)."""

    def __init__(self, attn_norm: RMSNorm, attn: Attention, ffn_norm: RMSNorm, ffn: FeedForward,
                 attn_post_norm: RMSNorm | None = None, ffn_post_norm: RMSNorm | None = None):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn
        self.attn_post_norm, self.ffn_post_norm = attn_post_norm, ffn_post_norm

    def forward(self, x: torch.Tensor, rope: Rope, positions: torch.Tensor, blocked: torch.Tensor,
                cache: KVCache, layer: int, slots: torch.Tensor) -> torch.Tensor:  # [B, T, E]
        a = self.attn(self.attn_norm(x), rope, positions, blocked, cache, layer, slots)
        h = x + (a if self.attn_post_norm is None else self.attn_post_norm(a))
        f = self.ffn(self.ffn_norm(h))
        return h + (f if self.ffn_post_norm is None else self.ffn_post_norm(f))


class Transformer(nn.Module):
    """Token embedding (times ``embd_scale``), blocks, final norm, output projection,
    optional final soft-cap."""

    def __init__(self, cfg: ModelConfig, embedding: torch.Tensor, blocks: list[Block],
                 output_norm: RMSNorm, output: nn.Module, rope: Rope):
        super().__init__()
        self.cfg = cfg
        self.embedding = embedding  # [n_vocab, E], possibly a view of the tied output weight
        self.blocks = nn.ModuleList(blocks)
        self.output_norm, self.output, self.rope = output_norm, output, rope
        # Gemma: ggml_scale(inpL, sqrtf(n_embd)) in float32
        self.embd_scale = float(np.sqrt(np.float32(cfg.n_embd))) if cfg.spec.embd_scale else None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor, last_only: bool = False, select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``tokens`` [B, T] at ``positions`` [B, T] for sequences in cache
        ``slots`` [B]. Padding (position < 0) must sit at the right end of a row.
        Returns float32 [B, T, n_vocab], or [B, n_vocab] for each row's last real token,
        or [len(select), n_vocab] for the tokens ``select`` (Long, flat indices b * T + t).
        Rows may share a slot (a prompt chunk as T=1 rows beside other sequences' decode
        rows): every key/value of the step is written before any query attends.
        """
        x = self.embedding[tokens.clamp(min=0)]                       # [B, T, E]
        if self.embd_scale is not None:
            x = x * self.embd_scale
        q_pos = positions.clamp(min=0)                                # padding attends to 0 only
        n_seen = int(positions.max()) + 1
        key_pos = torch.arange(n_seen, device=positions.device)
        after = key_pos[None, None, :] > q_pos[:, :, None]            # [B, T, S]
        blocked = after[:, None, None]                                # [B, 1, 1, T, S]
        blocked_swa = None
        if self.cfg.n_swa:  # llama.cpp's is_masked_swa (standard): p1 - p0 >= n_swa is masked
            blocked_swa = (after | (q_pos[:, :, None] - key_pos[None, None, :] >= self.cfg.n_swa))[:, None, None]
        for layer, block in enumerate(self.blocks):
            mask = blocked_swa if blocked_swa is not None and self.cfg.is_swa(layer) else blocked
            x = block(x, self.rope, positions, mask, cache, layer, slots)
        if select is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, select)    # [len(select), E]
            if x.shape[0] == 0:                                       # only the cache was wanted
                return x.new_zeros((0, self.cfg.n_vocab))
        elif last_only:
            last = (positions >= 0).sum(1) - 1                        # [B]
            x = x[torch.arange(x.shape[0], device=x.device), last]    # [B, E]
        logits = self.output(self.output_norm(x))
        if self.cfg.final_softcap:
            c = self.cfg.final_softcap
            logits = torch.tanh(logits / c) * c
        return logits
