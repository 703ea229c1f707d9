"""Architectures as data: every way a supported GGUF architecture differs from Llama.

llama.cpp builds each architecture's graph from a few choices (``llm_build_*`` with
``build_norm``, ``build_ffn(..., LLM_FFN_SILU | LLM_FFN_GELU, LLM_FFN_PAR)``, the rope type
of ``llama_model_rope_type``) and names every tensor from a template
(``LLM_TENSOR_NAMES``: ``blk.{bid}.attn_q.weight``). An :class:`ArchSpec` records exactly
those choices, so the block (``gguflm.model.layers``) is written once and composed from
them, and a new Llama-like architecture is a table entry:

    rope            NORM pairs (2i, 2i+1) or NEOX pairs (i, i + D/2)
    activation      gated FFN activation: silu(g) * u (SwiGLU) or gelu_tanh(g) * u (GeGLU)
    post_norms      Gemma: RMSNorm on the attention and FFN outputs before each residual add
    qk_norm         Qwen3, Gemma 3: RMSNorm over each head of q and k, before RoPE
    fused_qkv       Phi-3: one ``attn_qkv`` tensor holds the rows of [Wq; Wk; Wv]
    fused_gate_up   Phi-3: ``ffn_up`` holds [Wgate; Wup] (2 * n_ff rows)
    embd_scale      Gemma: the token embedding is multiplied by sqrt(n_embd)
    sliding_window  Gemma 3: ``attention.sliding_window`` is read; layers follow a pattern
                    (every ``swa_pattern``-th layer global, the others local, with their own
                    RoPE base ``rope.freq_base_swa``, default 10000)
    final_softcap   ``final_logit_softcapping`` is read: logits = c * tanh(logits / c)
    longrope        Phi-3: ``rope_factors_short``/``_long`` divide the RoPE frequencies, the
                    short ones for contexts up to ``rope.scaling.original_context_length``
                    (llama.cpp's ``get_rope_factors``)
    bias_roles      linear roles whose ``.bias`` is used when the file has one (Qwen2's QKV)

The :class:`WeightTable` resolves every role of a file once (names, expected shapes, row
ranges inside fused tensors, biases); the CPU loader, the CUDA weights and ``verify`` all
read tensors through it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gguflm.errors import GGUFError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from gguflm.gguf.reader import GGUFFile
    from gguflm.gguf.types import GGMLType
    from gguflm.model.config import ModelConfig


class RopeStyle(enum.Enum):
    NORM = "norm"  # rotate (x[2i], x[2i+1]); GGUF Q/K rows are stored permuted for this
    NEOX = "neox"  # rotate (x[i], x[i + n_rot/2])


class Activation(enum.Enum):
    SILU = "silu"            # silu(g) = g / (1 + e^-g)                         (LLM_FFN_SILU)
    GELU_TANH = "gelu_tanh"  # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))  (LLM_FFN_GELU)


# Tensor roles (_TEMPLATES' keys; global roles are formatted without ``bid``). ``attn_q/k/v`` and
# ``ffn_gate/up`` are always roles; where the arch fuses them they name row ranges of ``attn_qkv`` / ``ffn_up``.
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

_TEMPLATES = {
    "token_embd": "token_embd.weight",
    "output_norm": "output_norm.weight",
    "output": "output.weight",
    "rope_freqs": "rope_freqs.weight",
    "rope_factors_long": "rope_factors_long.weight",
    "rope_factors_short": "rope_factors_short.weight",
    "attn_norm": "blk.{bid}.attn_norm.weight",
    "attn_q": "blk.{bid}.attn_q.weight",
    "attn_k": "blk.{bid}.attn_k.weight",
    "attn_v": "blk.{bid}.attn_v.weight",
    "attn_qkv": "blk.{bid}.attn_qkv.weight",
    "attn_output": "blk.{bid}.attn_output.weight",
    "attn_q_norm": "blk.{bid}.attn_q_norm.weight",
    "attn_k_norm": "blk.{bid}.attn_k_norm.weight",
    "attn_post_norm": "blk.{bid}.post_attention_norm.weight",
    "ffn_norm": "blk.{bid}.ffn_norm.weight",
    "ffn_gate": "blk.{bid}.ffn_gate.weight",
    "ffn_up": "blk.{bid}.ffn_up.weight",
    "ffn_down": "blk.{bid}.ffn_down.weight",
    "ffn_post_norm": "blk.{bid}.post_ffw_norm.weight",
}


@dataclass(frozen=True)
class ArchSpec:
    """The choices of one GGUF architecture (see the module docstring)."""

    name: str
    rope: RopeStyle
    activation: Activation = Activation.SILU
    bias_roles: frozenset[str] = frozenset()
    post_norms: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    embd_scale: bool = False
    sliding_window: bool = False
    swa_pattern: int = 0          # default sliding_window_pattern (llama.cpp's load_swa_pattern)
    final_softcap: bool = False
    longrope: bool = False
    # n_layer values whose attention scale is 1/sqrt(n_embd / n_head) instead of 1/sqrt(head_dim)
    # (llama.cpp's Gemma 3 27B rule, from gemma_pytorch's query_pre_attn_scalar)
    attn_scale_by_embd: frozenset[int] = frozenset()
    tensors: dict[str, str] = field(default_factory=lambda: dict(_TEMPLATES))

    def tensor_name(self, role: str, bid: int | None = None) -> str:
        """The GGUF tensor name of ``role`` (in block ``bid`` for block roles)."""
        template = self.tensors[role]
        return template.format(bid=bid) if bid is not None else template

    def bias_name(self, role: str, bid: int) -> str | None:
        """The name of ``role``'s bias in block ``bid``, or None if this arch has none."""
        if role not in self.bias_roles:
            return None
        return self.tensor_name(role, bid).removesuffix(".weight") + ".bias"

    def block_norm_roles(self) -> tuple[str, ...]:
        """The norm roles every block of this arch has."""
        roles = ["attn_norm", "ffn_norm"]
        if self.qk_norm:
            roles += ["attn_q_norm", "attn_k_norm"]
        if self.post_norms:
            roles += ["attn_post_norm", "ffn_post_norm"]
        return tuple(roles)


ARCHS: dict[str, ArchSpec] = {
    # TinyLlama, SmolLM2, Llama 2, Llama 3.x and Mistral 7B all ship as "llama" (llama.cpp
    # ignores a sliding window for it). llama.cpp loads optional biases for every linear.
    "llama": ArchSpec("llama", RopeStyle.NORM, bias_roles=frozenset(LINEAR_ROLES)),
    # Qwen2 / Qwen2.5: NEOX rope, biases on q, k, v (llama.cpp: create_tensor_qkv with biases)
    "qwen2": ArchSpec("qwen2", RopeStyle.NEOX, bias_roles=frozenset({"attn_q", "attn_k", "attn_v"})),
    # Qwen3: NEOX rope, RMSNorm over each q and k head before RoPE, no biases
    "qwen3": ArchSpec("qwen3", RopeStyle.NEOX, qk_norm=True),
    # Phi-3: NEOX rope, fused QKV, fused gate+up (LLM_FFN_SWIGLU on ffn_up's 2 n_ff rows);
    # llama.cpp disables Phi-3's sliding window (the key is read and ignored); Phi-3.5 and the
    # 128k Phi-3 models carry long/short RoPE factors
    "phi3": ArchSpec("phi3", RopeStyle.NEOX, fused_qkv=True, fused_gate_up=True, longrope=True,
                     bias_roles=frozenset({"attn_qkv", "attn_output"})),
    # Gemma 3: NEOX rope, GeGLU, pre+post norms, q/k norms, sqrt(n_embd) embedding scale,
    # local (sliding window, freq_base_swa) and global layers, every 6th global by default
    "gemma3": ArchSpec("gemma3", RopeStyle.NEOX, activation=Activation.GELU_TANH, post_norms=True, qk_norm=True,
                       embd_scale=True, sliding_window=True, swa_pattern=6, final_softcap=True,
                       attn_scale_by_embd=frozenset({62})),
}


def arch_spec(name: str | None) -> ArchSpec:
    """The spec of a GGUF ``general.architecture``; anything else is a GGUFError."""
    if name is None:
        raise GGUFError("missing metadata key 'general.architecture'")
    try:
        return ARCHS[name]
    except KeyError:
        raise GGUFError(f"unsupported architecture {name!r} (supported: {', '.join(sorted(ARCHS))})") from None


# --- the weight resolver ----------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """Where one role's weight lives: tensor ``name`` (rows ``rows`` of it when the role is
    part of a fused tensor), the role's ggml shape (ne0 first), and its bias, if any (the
    same row range of ``bias``)."""

    role: str
    name: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    bias: str | None = None


def role_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The ggml shape (ne0 first) of every role's weight; a linear's bias is ``(ne1,)``."""
    E, q_out, kv_out = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    return {
        "token_embd": (E, cfg.n_vocab), "output": (E, cfg.n_vocab), "output_norm": (E,),
        "rope_freqs": (cfg.n_rot // 2,), "attn_norm": (E,), "ffn_norm": (E,),
        "attn_q_norm": (cfg.head_dim,), "attn_k_norm": (cfg.head_dim,),
        "attn_post_norm": (E,), "ffn_post_norm": (E,),
        "attn_q": (E, q_out), "attn_k": (E, kv_out), "attn_v": (E, kv_out), "attn_output": (q_out, E),
        "ffn_gate": (E, cfg.n_ff), "ffn_up": (E, cfg.n_ff), "ffn_down": (cfg.n_ff, E),
    }


def _off_cpu(device: torch.device | str) -> torch.device | None:
    """``device`` when it is not the CPU, else None: a GPU-bound tensor is dequantized
    there, by the torch path, so that loading for a GPU never builds the CPU kernels
    (their first build, 10-40 s, would otherwise sit in the CUDA cold start)."""
    import torch

    d = torch.device(device)
    return None if d.type == "cpu" else d


class WeightTable:
    """Every tensor role of one file, resolved and checked once against the config.

    ``slot(role, bid)`` says where a role lives; ``raw`` gives its bytes (a row range of a
    fused tensor is a zero-copy slice: ggml rows are whole blocks), ``dense`` its exact
    float32 values. Missing tensors, wrong shapes and tensors this engine would not use
    are GGUFErrors naming the tensor.
    """

    def __init__(self, f: GGUFFile, cfg: ModelConfig):
        self.f, self.cfg = f, cfg
        self.spec = spec = arch_spec(cfg.arch)
        shapes = role_shapes(cfg)
        self.slots: dict[tuple[str, int | None], Slot] = {}
        self.used: set[str] = set()

        def take(role: str, bid: int | None, name: str, shape: tuple[int, ...],
                 rows: tuple[int, int] | None = None, bias_role: str | None = None) -> None:
            info = f.tensors.get(name)
            if info is None:
                raise GGUFError(f"missing tensor {name!r}")
            whole = shape if rows is None else (shape[0], self._fused_rows(role))
            if tuple(info.shape) != whole:
                raise GGUFError(f"tensor {name!r} has shape {list(info.shape)}, expected {list(whole)}")
            bias = spec.bias_name(bias_role or role, bid) if bid is not None else None
            if bias is not None and bias in f.tensors:
                if tuple(f.tensors[bias].shape) != (whole[1],):
                    raise GGUFError(f"tensor {bias!r} has shape {list(f.tensors[bias].shape)}, expected [{whole[1]}]")
                self.used.add(bias)
            else:
                bias = None
            self.used.add(name)
            self.slots[(role, bid)] = Slot(role, name, shape, rows, bias)

        take("token_embd", None, spec.tensor_name("token_embd"), shapes["token_embd"])
        take("output_norm", None, spec.tensor_name("output_norm"), shapes["output_norm"])
        if not cfg.tied_output:
            take("output", None, spec.tensor_name("output"), shapes["output"])
        if cfg.has_rope_freqs:
            take("rope_freqs", None, spec.tensor_name("rope_freqs"), shapes["rope_freqs"])
        if cfg.has_longrope:
            for role in ("rope_factors_long", "rope_factors_short"):
                take(role, None, spec.tensor_name(role), shapes["rope_freqs"])
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
        for bid in range(cfg.n_layer):
            for role in spec.block_norm_roles():
                take(role, bid, spec.tensor_name(role, bid), shapes[role])
            if spec.fused_qkv:
                qkv = spec.tensor_name("attn_qkv", bid)
                for role, rows in (("attn_q", (0, q)), ("attn_k", (q, q + kv)), ("attn_v", (q + kv, q + 2 * kv))):
                    take(role, bid, qkv, shapes[role], rows, bias_role="attn_qkv")
            else:
                for role in ("attn_q", "attn_k", "attn_v"):
                    take(role, bid, spec.tensor_name(role, bid), shapes[role])
            take("attn_output", bid, spec.tensor_name("attn_output", bid), shapes["attn_output"])
            if spec.fused_gate_up:
                up = spec.tensor_name("ffn_up", bid)
                take("ffn_gate", bid, up, shapes["ffn_gate"], (0, cfg.n_ff))
                take("ffn_up", bid, up, shapes["ffn_up"], (cfg.n_ff, 2 * cfg.n_ff))
            else:
                take("ffn_gate", bid, spec.tensor_name("ffn_gate", bid), shapes["ffn_gate"])
                take("ffn_up", bid, spec.tensor_name("ffn_up", bid), shapes["ffn_up"])
            take("ffn_down", bid, spec.tensor_name("ffn_down", bid), shapes["ffn_down"])

    def rope_factors(self, n_ctx: int | None = None) -> torch.Tensor | None:
        """The float32 divisors of the RoPE frequencies [n_rot/2], or None: ``rope_freqs``
        (Llama 3); else Phi-3's long factors for a context longer than the original one
        (``n_ctx > cfg.n_ctx_orig``), its short ones otherwise (``n_ctx`` None: short)."""
        if self.cfg.has_rope_freqs:
            return self.dense("rope_freqs")
        if self.cfg.has_longrope:
            long = n_ctx is not None and n_ctx > self.cfg.n_ctx_orig
            return self.dense("rope_factors_long" if long else "rope_factors_short")
        return None

    def _fused_rows(self, role: str) -> int:
        c = self.cfg
        if role in ("attn_q", "attn_k", "attn_v"):
            return (c.n_head + 2 * c.n_head_kv) * c.head_dim
        return 2 * c.n_ff  # ffn_gate / ffn_up in one ffn_up

    def slot(self, role: str, bid: int | None = None) -> Slot:
        try:
            return self.slots[(role, bid)]
        except KeyError:
            raise GGUFError(f"{self.spec.name}: no tensor for role {role!r}"
                            + (f" in block {bid}" if bid is not None else "")) from None

    def has(self, role: str, bid: int | None = None) -> bool:
        return (role, bid) in self.slots

    def unused(self) -> list[str]:
        """Tensors of the file that no role reads."""
        return [n for n in self.f.tensors if n not in self.used]

    def ggml_type(self, role: str, bid: int | None = None) -> GGMLType:
        return self.f.tensors[self.slot(role, bid).name].ggml_type

    def raw(self, role: str, bid: int | None = None) -> np.ndarray:
        """The role's bytes: the whole tensor, or its rows of a fused tensor (zero-copy)."""
        s = self.slot(role, bid)
        data = self.f.tensor_data(s.name)
        if s.rows is None:
            return data
        info = self.f.tensors[s.name]
        row_bytes = info.nbytes // info.shape[1]
        return data[s.rows[0] * row_bytes:s.rows[1] * row_bytes]

    def dense(self, role: str, bid: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """The role's weight as exact float32, rows first (shape reversed(slot.shape))."""
        from gguflm.quant import dequantize

        s = self.slot(role, bid)
        return dequantize(self.raw(role, bid), self.ggml_type(role, bid), s.shape, device=_off_cpu(device)).to(device)

    def bias(self, role: str, bid: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The role's float32 bias [n_out] (its row range of a fused bias), or None."""
        return self.slot_bias(self.slot(role, bid), device)

    def slot_bias(self, s: Slot, device: torch.device | str = "cpu") -> torch.Tensor | None:
        from gguflm.quant import dequantize

        if s.bias is None:
            return None
        info = self.f.tensors[s.bias]
        b = dequantize(self.f.tensor_data(s.bias), info.ggml_type, info.shape, device=_off_cpu(device))
        return (b if s.rows is None else b[s.rows[0]:s.rows[1]]).to(device)
