"""The torch reference of the decoder: the block's composition of :mod:`gguflm.model.decoder`
(written once for every device) with :class:`TorchOps`, the plain-torch provider of its
ops, as llama.cpp's ``llm_build_*`` graphs compute them::

    attention: q, k, v = Wq n, Wk n, Wv n (+ biases); q, k = rope(qk_norm(q)), rope(qk_norm(k));
               softmax(q k^T * scale + causal/sliding-window mask) v
    norm_gated: act(Wg n) * Wu n, act = SiLU or GELU-tanh

plus the embedding, RoPE tables, output head (:class:`Transformer`).

Shapes: B batch rows, T new tokens per row, S cached positions a row attends to,
E = n_embd, H query heads, Hkv key/value heads, D head size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gguflm.model import decoder
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


def attention(rope: Rope, positions: torch.Tensor, blocked: torch.Tensor, cache: KVCache,
              slots: torch.Tensor) -> Callable:
    """The decoder's ``attention`` op over the KV cache (see :mod:`gguflm.model.decoder`):
    causal grouped-query self-attention, query head h reading KV head ``h // (H / Hkv)``,
    scores scaled by the layer's ``scale``. positions: [B, T] (< 0 = padding); blocked:
    Bool[B, 1, 1, T, S], True where a query may not see a key (the Transformer's mask: the
    sliding window on a ``local`` layer, which also has its own RoPE table)."""
    B, T = positions.shape
    rope_pos = positions.clamp(min=0)

    def attend(i: int, layer: Block, qkv: tuple) -> torch.Tensor:  # -> [B, T, H D]
        H, Hkv, D = layer.n_head, layer.n_head_kv, layer.head_dim
        q, k, v = qkv
        q = q.view(B, T, H, D).transpose(1, 2)                                     # [B, H, T, D]
        k = k.view(B, T, Hkv, D).transpose(1, 2)                                   # [B, Hkv, T, D]
        v = v.view(B, T, Hkv, D).transpose(1, 2)                                   # [B, Hkv, T, D]
        q, k = rope(q, rope_pos, layer.local), rope(k, rope_pos, layer.local)
        keys, values = cache.update(i, slots, positions, k, v)                     # [B, Hkv, S, D]
        g = H // Hkv
        q = q.reshape(B, Hkv, g * T, D)                                            # heads of a KV group
        scores = (q @ keys.transpose(-1, -2)) * layer.scale                        # [B, Hkv, g*T, S]
        scores = scores.view(B, Hkv, g, T, -1).masked_fill(blocked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(B, Hkv, g * T, -1)
        out = (probs @ values).view(B, H, T, D)                                    # [B, H, T, D]
        return out.transpose(1, 2).reshape(B, T, H * D)

    return attend


ACTIVATIONS = {
    Activation.SILU: F.silu,
    Activation.GELU_TANH: lambda g: F.gelu(g, approximate="tanh"),
}


class TorchOps:
    """The ops of :mod:`gguflm.model.decoder` in plain torch, float32 (the reference the
    fused providers are tested against): the residual stream ``x`` [B, T, E]; ``qkv`` the
    tuple of the three projections [B, T, H D], [B, T, Hkv D], [B, T, Hkv D] (after
    ``head_norm``: [B, T, heads, D]). Every linear and norm is the layer's own module,
    called as a module (verify's capture hooks observe them)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def norm_linear(self, norm: RMSNorm, lins: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
        n = norm(self.x)
        return tuple(lin(n) for lin in lins)

    def head_norm(self, qkv: tuple, q_norm: RMSNorm, k_norm: RMSNorm) -> tuple:
        q, k, v = qkv
        D = q_norm.weight.shape[0]
        return q_norm(q.unflatten(-1, (-1, D))), k_norm(k.unflatten(-1, (-1, D))), v

    def linear_add(self, a: torch.Tensor, lin: nn.Module, post: RMSNorm | None) -> None:
        y = lin(a)
        self.x = self.x + (y if post is None else post(y))

    def norm_gated(self, layer: Block) -> torch.Tensor:
        n = layer.ffn_norm(self.x)
        return ACTIVATIONS[layer.activation](layer.w_gate(n)) * layer.w_up(n)


class Block(nn.Module):
    """One decoder block's weights, named as :mod:`gguflm.model.decoder` reads a layer (the
    roles of the ArchSpec; optional parts None), and its head counts (this rank's, under
    tensor parallelism), score scale and activation. Its forward is the decoder's block
    with the torch ops: ``h = x + post1(Wo attn(norm1(x)))``; ``out = h + post2(ffn(norm2(h)))``."""

    def __init__(self, cfg: ModelConfig, attn_norm: RMSNorm, wq: nn.Module, wk: nn.Module, wv: nn.Module,
                 wo: nn.Module, ffn_norm: RMSNorm, w_gate: nn.Module, w_up: nn.Module, w_down: nn.Module,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None,
                 attn_post_norm: RMSNorm | None = None, ffn_post_norm: RMSNorm | None = None,
                 local: bool = False, activation: Activation = Activation.SILU):
        super().__init__()
        self.attn_norm, self.wq, self.wk, self.wv, self.wo = attn_norm, wq, wk, wv, wo
        self.q_norm, self.k_norm = q_norm, k_norm
        self.ffn_norm, self.w_gate, self.w_up, self.w_down = ffn_norm, w_gate, w_up, w_down
        self.attn_post_norm, self.ffn_post_norm = attn_post_norm, ffn_post_norm
        self.n_head, self.n_head_kv, self.head_dim = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        self.scale, self.local, self.activation = cfg.scale, local, activation
        self.window = cfg.n_swa if local else 0

    @property
    def qkv(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.wq, self.wk, self.wv

    def compose(self, ops, i: int, attention: Callable) -> None:
        """The decoder's block over ``ops`` (how a fused provider, which does not import the
        model, records the composition: :class:`gguflm.kernels.cpu.block.Program`)."""
        decoder.block(ops, i, self, attention)

    def forward(self, x: torch.Tensor, rope: Rope, positions: torch.Tensor, blocked: torch.Tensor,
                cache: KVCache, layer: int, slots: torch.Tensor) -> torch.Tensor:  # [B, T, E]
        ops = TorchOps(x)
        self.compose(ops, layer, attention(rope, positions, blocked, cache, slots))
        return ops.x


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
