"""A float64 recomputation of the forward pass of every supported architecture, the
yardstick for the engine.

Deliberately separate from gguflm.model: plain code, one loop over layers and one over
heads, every step in float64 from the exactly dequantized weights, RoPE angles from the
closed form ``p * base^(-2i/d)``. The architectures' differences are written here again,
from llama.cpp's graphs (``src/models/*.cpp``), not taken from gguflm.model's ArchSpec: a
wrong flag there then shows up as a disagreement. It is shown to agree with llama.cpp on
F16/F32 files of each architecture (tests/model), and the engine is then measured
against it.

What it computes, for tokens ``t_0 .. t_{T-1}`` at positions ``0 .. T-1``::

    x = E[t]   (* sqrt(n_embd) for Gemma)                  # E: token_embd, a row per token
    per layer:  h = rms(x) * w_attn_norm
                q, k, v = h Wq^T (+bq), h Wk^T (+bk), h Wv^T (+bv)   split into heads
                    (Phi-3: rows of one attn_qkv)
                q, k = rms(q) * w_q_norm, rms(k) * w_k_norm per head   (Qwen3, Gemma 3)
                q, k rotated: pairs (2i, 2i+1) (llama) or (i, i + d/2) (the others) of
                    position p by theta = freq_scale * p * base^(-2i/d) / rope_freqs[i]
                    (Phi-3: / rope_factors_short[i], the factors llama.cpp and gguflm use
                    for contexts up to rope.scaling.original_context_length);
                    cos and sin times rope.scaling.attn_factor
                    (Gemma 3's local layers: base = rope.freq_base_swa, freq_scale 1)
                head j attends causally with KV head j // (n_head / n_head_kv),
                    softmax(q k^T * scale) v; scale = 1/sqrt(d) (Gemma 3 27B: 1/sqrt(n_embd/n_head));
                    local layers only see keys with p_q - p_k < sliding_window
                o = concat(heads) Wo^T (+bo);  x = x + o   (Gemma: x + rms(o) * w_post_attn)
                h = rms(x) * w_ffn_norm
                f = (act(h Wg^T) * (h Wu^T)) Wd^T, act = silu, Gemma: gelu_tanh
                    (Phi-3: gate and up are the two halves of ffn_up's rows)
                x = x + f   (Gemma: x + rms(f) * w_post_ffw)
    logits = (rms(x) * w_output_norm) W_out^T          # W_out = token_embd when output is absent
             (c * tanh(logits / c) when final_logit_softcapping = c is set)
    rms(x) = x / sqrt(mean(x^2) + eps)
    silu(g) = g / (1 + e^-g); gelu_tanh(g) = g/2 (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
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


# --- the float64 steps (verify.components checks the engine's steps against them too) --------

def rms_norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, E] -> [T, E]: ``x / sqrt(mean(x^2) + eps) * w``."""
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def rotate64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """RoPE's rotation of the pairs of x's last dim, ``(i, i + h)`` (NEOX) or ``(2i, 2i+1)``,
    i < h = ``cos.shape[-1]``: ``(a, b) -> (a cos - b sin, a sin + b cos)``, cos and sin
    broadcast against ``x[..., :h]``."""
    h = cos.shape[-1]
    first, second = (slice(0, h), slice(h, 2 * h)) if neox else (slice(0, 2 * h, 2), slice(1, 2 * h, 2))
    a, b = x[..., first], x[..., second]
    out = x.clone()
    out[..., first] = a * cos - b * sin
    out[..., second] = a * sin + b * cos
    return out


def attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                scale: float | None = None, window: int = 0) -> torch.Tensor:
    """q [H, T, D], k/v [Hkv, T, D] -> [T, H*D]: head j attends with KV head ``j // (H/Hkv)``
    to the keys at positions <= its own (and, with a ``window``, p_q - p_k < window),
    ``softmax(q k^T * scale) v``, scale 1/sqrt(D) by default."""
    n_head, T, D = q.shape
    group = n_head // k.shape[0]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    visible = positions[None, :] <= positions[:, None]                              # [T, T]
    if window:
        visible = visible & (positions[:, None] - positions[None, :] < window)
    heads = []
    for j in range(n_head):
        scores = (q[j] @ k[j // group].T) * scale                                   # [T, T]
        scores = scores.masked_fill(~visible, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[j // group])                 # [T, D]
    return torch.cat(heads, dim=-1)


def swiglu64(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` with ``silu(g) = g / (1 + exp(-g))``."""
    return g / (1.0 + torch.exp(-g)) * u


def geglu64(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(g) * u``, ``gelu_tanh(g) = g/2 (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))``."""
    return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3))) * u


# What each architecture's llama.cpp graph does beyond Llama's (see the module docstring).
_ARCHS: dict[str, dict[str, object]] = {
    "llama": {"neox": False},
    "qwen2": {"neox": True},
    "qwen3": {"neox": True, "qk_norm": True},
    "phi3": {"neox": True, "fused": True},
    "gemma3": {"neox": True, "qk_norm": True, "gemma": True},
}


def reference_logits(model: str | os.PathLike | GGUFFile, ids: Sequence[int],
                     weights: WeightFn | None = None) -> np.ndarray:
    """Float64 logits [len(ids), n_vocab] of the model in ``model``.
    ``weights`` supplies dequantized tensors by name (e.g. libggml's, or a cache shared by
    several calls); by default each is dequantized here with gguflm.dequantize."""
    f = model if isinstance(model, GGUFFile) else GGUFFile(model)
    arch = f.metadata.get("general.architecture")
    if arch not in _ARCHS:
        raise GGUFError(f"the float64 reference covers {', '.join(sorted(_ARCHS))}, not {arch!r}")
    facts = _ARCHS[arch]
    gemma = bool(facts.get("gemma"))

    def md(key: str, default: object = None) -> object:
        v = f.metadata.get(f"{arch}.{key}", default)
        if v is None:
            raise GGUFError(f"missing metadata key '{arch}.{key}'")
        return v

    n_layer, n_head = int(md("block_count")), int(md("attention.head_count"))
    n_head_kv = int(md("attention.head_count_kv", n_head))
    eps, base = float(md("attention.layer_norm_rms_epsilon")), float(md("rope.freq_base", 10000.0))
    scaling = md("rope.scaling.type", "linear")
    factor = float(md("rope.scaling.factor", 0.0)) or float(md("rope.scale_linear", 0.0))
    freq_scale = 1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor
    mscale = float(md("rope.scaling.attn_factor", 1.0))
    if scaling not in ("none", "linear"):
        if not (scaling == "longrope" and arch == "phi3"):
            raise GGUFError(f"the float64 reference does not implement RoPE scaling {scaling!r}")
    n_swa, local, base_swa, softcap = 0, [False] * n_layer, 10000.0, 0.0
    if gemma:  # llama_model_gemma3::load_arch_hparams
        n_swa = int(md("attention.sliding_window", 0))
        if n_swa > 0:
            pattern = md("attention.sliding_window_pattern", 6)
            local = list(pattern) if isinstance(pattern, list) else \
                [pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer)]
            base_swa = float(md("rope.freq_base_swa", 10000.0))
        softcap = float(md("final_logit_softcapping", 0.0))

    with torch.inference_mode():
        tokens = torch.tensor(list(ids), dtype=torch.long)
        T = len(tokens)
        x = _weight(f, "token_embd.weight", weights)[tokens]                   # [T, E]
        n_embd = x.shape[1]
        if gemma:
            x = x * math.sqrt(n_embd)
        head_dim = int(md("attention.key_length", n_embd // n_head))
        scale = 1.0 / math.sqrt(n_embd // n_head if gemma and n_layer == 62 else head_dim)
        half = head_dim // 2
        pos = torch.arange(T, dtype=torch.float64)

        def angles(b: float, fs: float) -> tuple[torch.Tensor, torch.Tensor]:
            inv_freq = torch.tensor([b ** (-2.0 * i / head_dim) for i in range(half)], dtype=torch.float64)
            if "rope_freqs.weight" in f.tensors:
                inv_freq = inv_freq / _weight(f, "rope_freqs.weight", weights)
            elif facts.get("fused") and "rope_factors_short.weight" in f.tensors:
                inv_freq = inv_freq / _weight(f, "rope_factors_short.weight", weights)
            theta = fs * pos[:, None] * inv_freq[None, :]                        # [T, d/2]
            return torch.cos(theta) * mscale, torch.sin(theta) * mscale

        tables = {False: angles(base, freq_scale), True: angles(base_swa, 1.0) if n_swa else None}

        def rope(z: torch.Tensor, is_local: bool) -> torch.Tensor:  # [T, heads, d]
            cos, sin = tables[is_local]
            return rotate64(z, cos[:, None, :], sin[:, None, :], bool(facts["neox"]))

        for layer in range(n_layer):
            p = f"blk.{layer}."
            h = rms_norm64(x, _weight(f, p + "attn_norm.weight", weights), eps)
            if facts.get("fused"):
                qkv = _linear(f, h, p + "attn_qkv", weights)
                nq, nkv = n_head * head_dim, n_head_kv * head_dim
                q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
            else:
                q, k, v = (_linear(f, h, p + f"attn_{c}", weights) for c in "qkv")
            q, k = q.reshape(T, n_head, head_dim), k.reshape(T, n_head_kv, head_dim)
            v = v.reshape(T, n_head_kv, head_dim)
            if facts.get("qk_norm"):
                q = rms_norm64(q, _weight(f, p + "attn_q_norm.weight", weights), eps)
                k = rms_norm64(k, _weight(f, p + "attn_k_norm.weight", weights), eps)
            q, k = rope(q, local[layer]), rope(k, local[layer])
            a = attention64(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), pos, scale,
                            n_swa if local[layer] else 0)                       # [T, H d]
            o = _linear(f, a, p + "attn_output", weights)
            x = x + (rms_norm64(o, _weight(f, p + "post_attention_norm.weight", weights), eps) if gemma else o)
            h = rms_norm64(x, _weight(f, p + "ffn_norm.weight", weights), eps)
            if facts.get("fused"):
                gu = _linear(f, h, p + "ffn_up", weights)
                g, u = gu[:, :gu.shape[1] // 2], gu[:, gu.shape[1] // 2:]
            else:
                g, u = _linear(f, h, p + "ffn_gate", weights), _linear(f, h, p + "ffn_up", weights)
            y = _linear(f, (geglu64 if gemma else swiglu64)(g, u), p + "ffn_down", weights)
            x = x + (rms_norm64(y, _weight(f, p + "post_ffw_norm.weight", weights), eps) if gemma else y)

        x = rms_norm64(x, _weight(f, "output_norm.weight", weights), eps)
        out_name = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
        logits = x @ _weight(f, out_name, weights).T
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.numpy()
