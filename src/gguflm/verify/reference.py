"""A float64 recomputation of a Llama-family forward pass, the yardstick for the engine.

Deliberately separate from gguflm.model: plain code, one loop over layers and one over
heads, every step in float64 from the exactly dequantized weights, RoPE angles from the
closed form ``p * base^(-2i/d)``. It is shown to agree with llama.cpp on an F16 file
(tests/model), and the engine is then measured against it.

What it computes, for tokens ``t_0 .. t_{T-1}`` at positions ``0 .. T-1``::

    x = E[t]                                           # E: token_embd, a row per token
    per layer:  h = rms(x) * w_attn_norm
                q, k, v = h Wq^T (+bq), h Wk^T (+bk), h Wv^T (+bv)   split into heads
                q, k rotated: pairs (2i, 2i+1) of position p by angle
                    theta = freq_scale * p * base^(-2i/d) / rope_freqs[i]
                head j attends causally with KV head j // (n_head / n_head_kv),
                    softmax(q k^T / sqrt(d)) v
                x = x + concat(heads) Wo^T (+bo)
                h = rms(x) * w_ffn_norm
                x = x + (silu(h Wg^T) * (h Wu^T)) Wd^T
    logits = (rms(x) * w_output_norm) W_out^T          # W_out = token_embd when output is absent
    rms(x) = x / sqrt(mean(x^2) + eps)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from gguflm.errors import GGUFError
from gguflm.gguf.reader import GGUFFile

# name -> the tensor dequantized, rows first (shape reversed(info.shape)); default gguflm.dequantize
WeightFn = Callable[[str], torch.Tensor]


def _weight(f: GGUFFile, name: str, weights: WeightFn | None = None) -> torch.Tensor:
    if weights is not None:
        return weights(name).to(torch.float64)
    from gguflm.quant import dequantize

    info = f.tensors[name]
    return dequantize(f.tensor_data(name), info.ggml_type, info.shape).to(torch.float64)


def _linear(f: GGUFFile, x: torch.Tensor, name: str, weights: WeightFn | None = None) -> torch.Tensor:
    y = x @ _weight(f, name + ".weight", weights).T
    if name + ".bias" in f.tensors:
        y = y + _weight(f, name + ".bias", weights)
    return y


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def reference_logits(model: str | os.PathLike | GGUFFile, ids: Sequence[int],
                     weights: WeightFn | None = None) -> np.ndarray:
    """Float64 logits [len(ids), n_vocab] of the Llama-architecture model in ``model``.
    ``weights`` supplies dequantized tensors by name (e.g. libggml's, or a cache shared by
    several calls); by default each is dequantized here with gguflm.dequantize."""
    f = model if isinstance(model, GGUFFile) else GGUFFile(model)
    arch = f.metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"the float64 reference covers the 'llama' architecture, not {arch!r}")

    def md(key: str, default: object = None) -> object:
        v = f.metadata.get(f"llama.{key}", default)
        if v is None:
            raise GGUFError(f"missing metadata key 'llama.{key}'")
        return v

    n_layer, n_head = int(md("block_count")), int(md("attention.head_count"))
    n_head_kv = int(md("attention.head_count_kv", n_head))
    eps, base = float(md("attention.layer_norm_rms_epsilon")), float(md("rope.freq_base", 10000.0))
    scaling = md("rope.scaling.type", "linear")
    factor = float(md("rope.scaling.factor", 0.0)) or float(md("rope.scale_linear", 0.0))
    freq_scale = 1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor
    mscale = float(md("rope.scaling.attn_factor", 1.0))
    if scaling not in ("none", "linear"):
        raise GGUFError(f"the float64 reference does not implement RoPE scaling {scaling!r}")

    with torch.inference_mode():
        tokens = torch.tensor(list(ids), dtype=torch.long)
        T = len(tokens)
        x = _weight(f, "token_embd.weight", weights)[tokens]                   # [T, E]
        n_embd = x.shape[1]
        head_dim = int(md("attention.key_length", n_embd // n_head))
        half = head_dim // 2
        inv_freq = torch.tensor([base ** (-2.0 * i / head_dim) for i in range(half)], dtype=torch.float64)
        if "rope_freqs.weight" in f.tensors:
            inv_freq = inv_freq / _weight(f, "rope_freqs.weight", weights)
        theta = freq_scale * torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, d/2]
        cos, sin = torch.cos(theta) * mscale, torch.sin(theta) * mscale
        causal = torch.ones(T, T, dtype=torch.bool).tril()

        def rope(z: torch.Tensor) -> torch.Tensor:  # [T, heads, d], pairs (2i, 2i+1)
            a, b = z[..., 0::2], z[..., 1::2]
            c, s = cos[:, None, :], sin[:, None, :]
            out = torch.empty_like(z)
            out[..., 0::2] = a * c - b * s
            out[..., 1::2] = a * s + b * c
            return out

        for layer in range(n_layer):
            p = f"blk.{layer}."
            h = _rms(x, _weight(f, p + "attn_norm.weight", weights), eps)
            q = rope(_linear(f, h, p + "attn_q", weights).view(T, n_head, head_dim))
            k = rope(_linear(f, h, p + "attn_k", weights).view(T, n_head_kv, head_dim))
            v = _linear(f, h, p + "attn_v", weights).view(T, n_head_kv, head_dim)
            heads = []
            for j in range(n_head):
                kv = j // (n_head // n_head_kv)
                scores = (q[:, j] @ k[:, kv].T) / math.sqrt(head_dim)          # [T, T]
                scores = scores.masked_fill(~causal, float("-inf"))
                heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])          # [T, d]
            x = x + _linear(f, torch.cat(heads, dim=1), p + "attn_output", weights)
            h = _rms(x, _weight(f, p + "ffn_norm.weight", weights), eps)
            g = _linear(f, h, p + "ffn_gate", weights)
            x = x + _linear(f, g / (1.0 + torch.exp(-g)) * _linear(f, h, p + "ffn_up", weights), p + "ffn_down",
                            weights)

        x = _rms(x, _weight(f, "output_norm.weight", weights), eps)
        out_name = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
        return (x @ _weight(f, out_name, weights).T).numpy()
