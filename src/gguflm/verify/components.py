"""Component checks: every step of the engine's forward pass recomputed by hand.

Each step is recomputed in float64 by the small functions below — code separate from
gguflm.model, written from the formulas, not from the engine — from weights that libggml
dequantized (``to_float``; gguflm's own dequantizers only when libggml is unavailable). The
input of each step is the engine's own float32 input for that step, captured on the real
prompt (:mod:`.capture`), so an error cannot hide behind an earlier one: each row of the
report measures one step alone. Where the engine fuses a whole block into one kernel, the
steps are those of its plain-torch twin on the same input, and the ``block`` row measures
the fused kernel itself.

    embedding     E[t]                                    vs  input of block 0
    attn_norm     x / sqrt(mean(x^2) + eps) * w           vs  attn_norm output
    q/k/v_proj    h W^T (+ b)                             vs  wq/wk/wv output
    rope_q/k      pair rotation by p * base^(-2i/d)       vs  rope output
    attention     causal softmax(q k^T / sqrt(d)) v, GQA  vs  wo input
    o_proj        a Wo^T (+ b)                            vs  wo output
    residual_attn x + o                                   vs  ffn_norm input
    ffn_norm      as attn_norm                            vs  ffn_norm output
    gate/up_proj  h W^T (+ b)                             vs  gate/up output
    swiglu        silu(g) * u, silu(g) = g / (1 + e^-g)   vs  down input
    down_proj     s Wd^T (+ b)                            vs  down output
    ffn           the whole FFN from ffn_norm's output    vs  down output
    residual_ffn  h + down                                vs  block output
    block         all of the above from the block's input  vs  the engine's block output
    output_norm   as attn_norm, on the last block output  vs  output_norm output
    lm_head       n W_out^T (W_out = token_embd if tied)  vs  logits

Thresholds bound the relative error ``||ours - ref|| / ||ref||``. A float32 step that is
computed correctly lands within a few units of float32 rounding (2^-24 = 6e-8) times the
growth of its summations; the thresholds leave one to two orders of magnitude above what
SmolLM2, TinyLlama-shaped and K-quant models show (see docs/verify.md), and stay far below
what a real mistake gives (a wrong rope pairing, eps or GQA mapping is >= 1e-2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gguflm.gguf.reader import GGUFFile
from gguflm.gguf.types import GGMLType
from gguflm.model.arch import ArchSpec, RopeStyle
from gguflm.model.config import ModelConfig
from gguflm.verify import ggml_oracle
from gguflm.verify.capture import Trace
from gguflm.verify.metrics import error_stats

# Relative-error thresholds per step (see the module docstring).
THRESHOLDS: dict[str, float] = {
    "embedding": 0.0,        # a row copy: must be bit-exact
    "attn_norm": 1e-5, "ffn_norm": 1e-5, "output_norm": 1e-5,
    "q_proj": 1e-5, "k_proj": 1e-5, "v_proj": 1e-5, "o_proj": 1e-5,
    "gate_proj": 1e-5, "up_proj": 1e-5, "down_proj": 1e-5, "lm_head": 1e-5,
    "rope_q": 1e-5, "rope_k": 1e-5,
    "attention": 1e-5,
    "swiglu": 1e-5, "ffn": 1e-5,
    "residual_attn": 1e-6, "residual_ffn": 1e-6,
    "block": 1e-5,           # the engine's own block (fused or not), from its input alone
}

WeightFn = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class ComponentResult:
    """One step of one layer (``layer`` None for steps outside the blocks)."""

    component: str
    layer: int | None
    max_abs: float
    rel: float
    threshold: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.rel) and self.rel <= self.threshold

    def to_dict(self) -> dict[str, object]:
        return {"component": self.component, "layer": self.layer, "max_abs": self.max_abs,
                "rel": self.rel, "threshold": self.threshold, "passed": self.passed}


def weight_loader(f: GGUFFile, use_libggml: bool) -> WeightFn:
    """``name -> float32 tensor`` (shape ``reversed(info.shape)``, exact values): libggml's
    ``to_float`` when ``use_libggml`` (F32 tensors are their own bytes), else
    :func:`gguflm.dequantize`."""

    def load(name: str) -> torch.Tensor:
        info = f.tensors[name]
        raw = f.tensor_data(name)
        if not use_libggml:
            from gguflm.quant import dequantize

            return dequantize(raw, info.ggml_type, info.shape)
        if info.ggml_type == GGMLType.F32:
            flat = np.frombuffer(raw, dtype=np.float32).copy()
        else:
            flat = ggml_oracle.ggml_to_float(raw, info.ggml_type, info.n_elements)
        return torch.from_numpy(flat).reshape(tuple(reversed(info.shape)))

    return load


# --- the manual calculation, float64 throughout -------------------------------------------

def rms_norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, E] -> [T, E]: ``x / sqrt(mean(x^2) + eps) * w``."""
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def linear64(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """[T, in] x [out, in] -> [T, out]: ``x W^T + b``."""
    y = x @ w.T
    return y if b is None else y + b


def rope64(x: torch.Tensor, positions: torch.Tensor, cfg: ModelConfig,
           freq_factors: torch.Tensor | None) -> torch.Tensor:
    """[H, T, D] -> [H, T, D]: rotate pair i of position p by
    ``freq_scale * p * base^(-2i/n_rot) / ff[i]``, cos and sin scaled by attn_factor.
    NORM pairs are ``(2i, 2i+1)``; NEOX pairs are ``(i, i + n_rot/2)``."""
    half = cfg.n_rot // 2
    inv = torch.tensor([cfg.rope_freq_base ** (-2.0 * i / cfg.n_rot) for i in range(half)], dtype=torch.float64)
    if freq_factors is not None:
        inv = inv / freq_factors
    theta = cfg.rope_freq_scale * positions.to(torch.float64)[:, None] * inv[None, :]   # [T, half]
    c, s = torch.cos(theta) * cfg.rope_attn_factor, torch.sin(theta) * cfg.rope_attn_factor
    if cfg.rope_style is RopeStyle.NORM:
        first, second = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
    else:
        first, second = slice(0, half), slice(half, 2 * half)
    a, b = x[..., first], x[..., second]
    out = x.clone()
    out[..., first] = a * c - b * s
    out[..., second] = a * s + b * c
    return out


def attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """q [H, T, D], k/v [Hkv, T, D] -> [T, H*D]: head j attends with KV head ``j // (H/Hkv)``
    to the keys at positions <= its own, ``softmax(q k^T / sqrt(D)) v``."""
    n_head, T, D = q.shape
    group = n_head // k.shape[0]
    visible = positions[None, :] <= positions[:, None]                              # [T, T]
    heads = []
    for j in range(n_head):
        scores = (q[j] @ k[j // group].T) / math.sqrt(D)                            # [T, T]
        scores = scores.masked_fill(~visible, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[j // group])                 # [T, D]
    return torch.cat(heads, dim=-1)


def swiglu64(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` with ``silu(g) = g / (1 + exp(-g))``."""
    return g / (1.0 + torch.exp(-g)) * u


# --- the comparison ---------------------------------------------------------------------

def _result(component: str, layer: int | None, ours: torch.Tensor, ref: torch.Tensor) -> ComponentResult:
    s = error_stats(ours, ref)
    return ComponentResult(component, layer, s.max_abs, s.rel, THRESHOLDS[component])


def check_components(trace: Trace, cfg: ModelConfig, spec: ArchSpec, f: GGUFFile,
                     weight: WeightFn) -> list[ComponentResult]:
    """Every step of ``trace`` recomputed by hand and compared (see the module docstring).
    ``weight``: see :func:`weight_loader`."""
    def w64(name: str) -> torch.Tensor:
        return weight(name).to(torch.float64)

    E = w64(spec.tensor_name("token_embd"))                                        # [V, E]
    out: list[ComponentResult] = []
    tokens = torch.tensor(trace.tokens, dtype=torch.long)
    out.append(_result("embedding", None, trace.block_in[0], E[tokens]))

    def lin(role: str, bid: int, x: torch.Tensor) -> torch.Tensor:
        bias = spec.bias_name(role, bid)
        b = w64(bias) if bias is not None and bias in f.tensors else None
        return linear64(x, w64(spec.tensor_name(role, bid)), b)

    ff_name = spec.tensor_name("rope_freqs")
    freq_factors = w64(ff_name) if ff_name in f.tensors else None
    Hkv, D = cfg.n_head_kv, cfg.head_dim
    pos = trace.positions

    def block64(x: torch.Tensor, bid: int) -> torch.Tensor:  # [T, E] -> [T, E], every step by hand
        T = x.shape[0]
        h = rms_norm64(x, w64(spec.tensor_name("attn_norm", bid)), cfg.rms_eps)
        q = rope64(lin("attn_q", bid, h).view(T, cfg.n_head, D).transpose(0, 1), pos, cfg, freq_factors)
        k = rope64(lin("attn_k", bid, h).view(T, Hkv, D).transpose(0, 1), pos, cfg, freq_factors)
        v = lin("attn_v", bid, h).view(T, Hkv, D).transpose(0, 1)
        x = x + lin("attn_output", bid, attention64(q, k, v, pos))
        h = rms_norm64(x, w64(spec.tensor_name("ffn_norm", bid)), cfg.rms_eps)
        return x + lin("ffn_down", bid, swiglu64(lin("ffn_gate", bid, h), lin("ffn_up", bid, h)))

    for bid in sorted(trace.layers):
        t = {k: v.to(torch.float64) for k, v in trace.layers[bid].items()}
        x = trace.block_in[bid].to(torch.float64)
        T = x.shape[0]
        out.append(_result("attn_norm", bid, t["attn_norm"],
                           rms_norm64(x, w64(spec.tensor_name("attn_norm", bid)), cfg.rms_eps)))
        for name, role in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            out.append(_result(name, bid, t[name[0]], lin(role, bid, t["attn_norm"])))
        for which in ("q", "k"):
            out.append(_result(f"rope_{which}", bid, t[f"rope_{which}_out"],
                               rope64(t[f"rope_{which}_in"], pos, cfg, freq_factors)))
        v = t["v"].view(T, Hkv, D).transpose(0, 1)                                  # [Hkv, T, D]
        out.append(_result("attention", bid, t["attn"],
                           attention64(t["rope_q_out"], t["rope_k_out"], v, pos)))
        out.append(_result("o_proj", bid, t["o"], lin("attn_output", bid, t["attn"])))
        out.append(_result("residual_attn", bid, t["h"], x + t["o"]))
        out.append(_result("ffn_norm", bid, t["ffn_norm"],
                           rms_norm64(t["h"], w64(spec.tensor_name("ffn_norm", bid)), cfg.rms_eps)))
        out.append(_result("gate_proj", bid, t["gate"], lin("ffn_gate", bid, t["ffn_norm"])))
        out.append(_result("up_proj", bid, t["up"], lin("ffn_up", bid, t["ffn_norm"])))
        out.append(_result("swiglu", bid, t["swiglu"], swiglu64(t["gate"], t["up"])))
        out.append(_result("down_proj", bid, t["down"], lin("ffn_down", bid, t["swiglu"])))
        ffn = lin("ffn_down", bid, swiglu64(lin("ffn_gate", bid, t["ffn_norm"]), lin("ffn_up", bid, t["ffn_norm"])))
        out.append(_result("ffn", bid, t["down"], ffn))
        out.append(_result("residual_ffn", bid, t["out"], t["h"] + t["down"]))
        out.append(_result("block", bid, trace.block_out[bid], block64(x, bid)))

    assert trace.output_norm_in is not None and trace.output_norm_out is not None and trace.logits is not None
    n_in, n_out = trace.output_norm_in.to(torch.float64), trace.output_norm_out.to(torch.float64)
    out.append(_result("output_norm", None, n_out,
                       rms_norm64(n_in, w64(spec.tensor_name("output_norm")), cfg.rms_eps)))
    head = spec.tensor_name("output")
    w_out = w64(head) if head in f.tensors else E
    out.append(_result("lm_head", None, trace.logits, linear64(n_out, w_out, None)))
    return out
