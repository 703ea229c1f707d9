"""Component checks: every step of the engine's forward pass recomputed by hand.

Each step is recomputed in float64 by the small functions below and those of the float64
reference (:mod:`.reference`: RMSNorm, attention, the gated activations) — code separate
from gguflm.model, written from the formulas, not from the engine — from weights that libggml
dequantized (``to_float``; gguflm's own dequantizers only when libggml is unavailable). The
input of each step is the engine's own float32 input for that step, captured on the real
prompt (:mod:`.capture`), so an error cannot hide behind an earlier one: each row of the
report measures one step alone. Where the engine fuses a whole block into one kernel, the
steps are those of its plain-torch twin on the same input, and the ``block`` row measures
the fused kernel itself.

    embedding     E[t] (* sqrt(n_embd): Gemma)            vs  input of block 0
    attn_norm     x / sqrt(mean(x^2) + eps) * w           vs  attn_norm output
    q/k/v_proj    h W^T (+ b)                             vs  wq/wk/wv output
    q/k_norm      RMSNorm of each head (Qwen3, Gemma 3)   vs  rope input
    rope_q/k      pair rotation by p * base^(-2i/d)       vs  rope output
                  (local layers: their own base)
    attention     causal softmax(q k^T * scale) v, GQA    vs  wo input
                  (local layers: sliding window)
    o_proj        a Wo^T (+ b)                            vs  wo output
    attn_post_norm  RMSNorm of o (Gemma)                  vs  attn_post_norm output
    residual_attn x + o (or + post-normed o)              vs  ffn_norm input
    ffn_norm      as attn_norm                            vs  ffn_norm output
    gate/up_proj  h W^T (+ b)                             vs  gate/up output
    swiglu        silu(g) * u, silu(g) = g / (1 + e^-g)   vs  down input
      or geglu    gelu_tanh(g) * u (Gemma)
    down_proj     s Wd^T (+ b)                            vs  down output
    ffn           the whole FFN from ffn_norm's output    vs  down output
    ffn_post_norm RMSNorm of the FFN output (Gemma)       vs  ffn_post_norm output
    residual_ffn  h + down (or + post-normed down)        vs  block output
    block         all of the above from the block's input  vs  the engine's block output
    output_norm   as attn_norm, on the last block output  vs  output_norm output
    lm_head       n W_out^T (W_out = token_embd if tied)  vs  logits
                  (c * tanh(. / c) with a final soft-cap)

The architecture's choices (which norms, which activation, q/k norms, the window) are
read from its ArchSpec and ModelConfig, so the checks follow the arch's own block; the
formulas themselves are written here, from llama.cpp's graphs.

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
from gguflm.model.arch import Activation, ArchSpec, RopeStyle, WeightTable
from gguflm.model.config import ModelConfig
from gguflm.verify import ggml_oracle
from gguflm.verify.capture import Trace
from gguflm.verify.metrics import error_stats
from gguflm.verify.reference import attention64, geglu64, rms_norm64, rotate64, swiglu64

# Relative-error thresholds per step (see the module docstring).
THRESHOLDS: dict[str, float] = {
    "embedding": 0.0,        # a row copy: must be bit-exact
    "attn_norm": 1e-5, "ffn_norm": 1e-5, "output_norm": 1e-5,
    "q_proj": 1e-5, "k_proj": 1e-5, "v_proj": 1e-5, "o_proj": 1e-5,
    "gate_proj": 1e-5, "up_proj": 1e-5, "down_proj": 1e-5, "lm_head": 1e-5,
    "rope_q": 1e-5, "rope_k": 1e-5,
    "attention": 1e-5,
    "swiglu": 1e-5, "geglu": 1e-5, "ffn": 1e-5,
    "q_norm": 1e-5, "k_norm": 1e-5, "attn_post_norm": 1e-5, "ffn_post_norm": 1e-5,
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
        flat = ggml_oracle.ggml_to_float(raw, info.ggml_type, info.n_elements)
        return torch.from_numpy(flat).reshape(tuple(reversed(info.shape)))

    return load


# --- the manual calculation, float64 throughout -------------------------------------------

def linear64(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """[T, in] x [out, in] -> [T, out]: ``x W^T + b``."""
    y = x @ w.T
    return y if b is None else y + b


def rope64(x: torch.Tensor, positions: torch.Tensor, cfg: ModelConfig,
           freq_factors: torch.Tensor | None, local: bool = False) -> torch.Tensor:
    """[H, T, D] -> [H, T, D]: rotate pair i of position p by
    ``freq_scale * p * base^(-2i/n_rot) / ff[i]``, cos and sin scaled by attn_factor
    (a local layer: base ``rope_freq_base_swa``, freq_scale 1).
    NORM pairs are ``(2i, 2i+1)``; NEOX pairs are ``(i, i + n_rot/2)``."""
    half = cfg.n_rot // 2
    base, fscale = (cfg.rope_freq_base_swa, 1.0) if local else (cfg.rope_freq_base, cfg.rope_freq_scale)
    inv = torch.tensor([base ** (-2.0 * i / cfg.n_rot) for i in range(half)], dtype=torch.float64)
    if freq_factors is not None:
        inv = inv / freq_factors
    theta = fscale * positions.to(torch.float64)[:, None] * inv[None, :]   # [T, half]
    c, s = torch.cos(theta) * cfg.rope_attn_factor, torch.sin(theta) * cfg.rope_attn_factor
    return rotate64(x, c, s, cfg.rope_style is RopeStyle.NEOX)


# --- the comparison ---------------------------------------------------------------------

def _result(component: str, layer: int | None, ours: torch.Tensor, ref: torch.Tensor) -> ComponentResult:
    s = error_stats(ours, ref)
    return ComponentResult(component, layer, s.max_abs, s.rel, THRESHOLDS[component])


def check_components(trace: Trace, cfg: ModelConfig, spec: ArchSpec, f: GGUFFile,
                     weight: WeightFn) -> list[ComponentResult]:
    """Every step of ``trace`` recomputed by hand and compared (see the module docstring).
    ``weight``: see :func:`weight_loader`."""
    table = WeightTable(f, cfg)

    def w64(role: str, bid: int | None = None) -> torch.Tensor:
        """A role's weight (its rows of a fused tensor), float64, rows first."""
        s = table.slot(role, bid)
        full = weight(s.name).to(torch.float64)
        return full if s.rows is None else full[s.rows[0]:s.rows[1]]

    def b64(role: str, bid: int) -> torch.Tensor | None:
        s = table.slot(role, bid)
        if s.bias is None:
            return None
        full = weight(s.bias).to(torch.float64)
        return full if s.rows is None else full[s.rows[0]:s.rows[1]]

    E = w64("token_embd")                                                            # [V, E]
    out: list[ComponentResult] = []
    tokens = torch.tensor(trace.tokens, dtype=torch.long)
    rows = E[tokens]
    if spec.embd_scale:  # llama.cpp: ggml_scale(rows, sqrtf(n_embd)), one float32 product per element
        scale = np.float32(np.sqrt(np.float32(cfg.n_embd)))
        rows = torch.from_numpy(rows.numpy().astype(np.float32) * scale).to(torch.float64)
    out.append(_result("embedding", None, trace.block_in[0], rows))

    def lin(role: str, bid: int, x: torch.Tensor) -> torch.Tensor:
        return linear64(x, w64(role, bid), b64(role, bid))

    def norm(role: str, bid: int, x: torch.Tensor) -> torch.Tensor:
        return rms_norm64(x, w64(role, bid), cfg.rms_eps)

    act64 = geglu64 if spec.activation is Activation.GELU_TANH else swiglu64
    act_name = "geglu" if spec.activation is Activation.GELU_TANH else "swiglu"
    factors = table.rope_factors()  # Phi-3: the short factors (contexts up to the original length)
    freq_factors = None if factors is None else factors.to(torch.float64)
    Hkv, D = cfg.n_head_kv, cfg.head_dim
    pos = trace.positions

    def attn64(bid: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        local = cfg.is_swa(bid)
        return attention64(q, k, v, pos, cfg.scale, cfg.n_swa if local else 0)

    def qk64(bid: int, h: torch.Tensor, role: str, n: int) -> torch.Tensor:  # [T, E] -> [n, T, D]
        z = lin(role, bid, h).view(h.shape[0], n, D)
        if spec.qk_norm:
            z = norm(role + "_norm", bid, z)
        return rope64(z.transpose(0, 1), pos, cfg, freq_factors, cfg.is_swa(bid))

    def block64(x: torch.Tensor, bid: int) -> torch.Tensor:  # [T, E] -> [T, E], every step by hand
        T = x.shape[0]
        h = norm("attn_norm", bid, x)
        q, k = qk64(bid, h, "attn_q", cfg.n_head), qk64(bid, h, "attn_k", Hkv)
        v = lin("attn_v", bid, h).view(T, Hkv, D).transpose(0, 1)
        o = lin("attn_output", bid, attn64(bid, q, k, v))
        x = x + (norm("attn_post_norm", bid, o) if spec.post_norms else o)
        h = norm("ffn_norm", bid, x)
        d = lin("ffn_down", bid, act64(lin("ffn_gate", bid, h), lin("ffn_up", bid, h)))
        return x + (norm("ffn_post_norm", bid, d) if spec.post_norms else d)

    for bid in sorted(trace.layers):
        t = {k: v.to(torch.float64) for k, v in trace.layers[bid].items()}
        x = trace.block_in[bid].to(torch.float64)
        T = x.shape[0]
        out.append(_result("attn_norm", bid, t["attn_norm"], norm("attn_norm", bid, x)))
        for name, role in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            out.append(_result(name, bid, t[name[0]], lin(role, bid, t["attn_norm"])))
        for which, n in (("q", cfg.n_head), ("k", Hkv)):
            if spec.qk_norm:  # the rope's input is the q/k norm's output
                normed = norm(f"attn_{which}_norm", bid, t[which].view(T, n, D)).transpose(0, 1)
                out.append(_result(f"{which}_norm", bid, t[f"rope_{which}_in"], normed))
            out.append(_result(f"rope_{which}", bid, t[f"rope_{which}_out"],
                               rope64(t[f"rope_{which}_in"], pos, cfg, freq_factors, cfg.is_swa(bid))))
        v = t["v"].view(T, Hkv, D).transpose(0, 1)                                  # [Hkv, T, D]
        out.append(_result("attention", bid, t["attn"], attn64(bid, t["rope_q_out"], t["rope_k_out"], v)))
        out.append(_result("o_proj", bid, t["o"], lin("attn_output", bid, t["attn"])))
        o = t["o"]
        if spec.post_norms:
            out.append(_result("attn_post_norm", bid, t["attn_post"], norm("attn_post_norm", bid, t["o"])))
            o = t["attn_post"]
        out.append(_result("residual_attn", bid, t["h"], x + o))
        out.append(_result("ffn_norm", bid, t["ffn_norm"], norm("ffn_norm", bid, t["h"])))
        out.append(_result("gate_proj", bid, t["gate"], lin("ffn_gate", bid, t["ffn_norm"])))
        out.append(_result("up_proj", bid, t["up"], lin("ffn_up", bid, t["ffn_norm"])))
        out.append(_result(act_name, bid, t["swiglu"], act64(t["gate"], t["up"])))
        out.append(_result("down_proj", bid, t["down"], lin("ffn_down", bid, t["swiglu"])))
        ffn = lin("ffn_down", bid, act64(lin("ffn_gate", bid, t["ffn_norm"]), lin("ffn_up", bid, t["ffn_norm"])))
        out.append(_result("ffn", bid, t["down"], ffn))
        d = t["down"]
        if spec.post_norms:
            out.append(_result("ffn_post_norm", bid, t["ffn_post"], norm("ffn_post_norm", bid, t["down"])))
            d = t["ffn_post"]
        out.append(_result("residual_ffn", bid, t["out"], t["h"] + d))
        out.append(_result("block", bid, trace.block_out[bid], block64(x, bid)))

    assert trace.output_norm_in is not None and trace.output_norm_out is not None and trace.logits is not None
    n_in, n_out = trace.output_norm_in.to(torch.float64), trace.output_norm_out.to(torch.float64)
    out.append(_result("output_norm", None, n_out, rms_norm64(n_in, w64("output_norm"), cfg.rms_eps)))
    w_out = E if cfg.tied_output else w64("output")
    logits = linear64(n_out, w_out, None)
    if cfg.final_softcap:
        logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    out.append(_result("lm_head", None, trace.logits, logits))
    return out
