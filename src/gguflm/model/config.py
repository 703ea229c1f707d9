"""ModelConfig: the hyperparameters of a decoder, read from GGUF metadata through one key
table (the keys llama.cpp's ``load_hparams`` and each arch's ``load_arch_hparams`` read).

Every value is untrusted: integers must be in range, floats finite, and the combination
consistent (heads divide, RoPE dims even, ...). A missing required key raises a
:class:`GGUFError` that names the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gguflm.errors import GGUFError
from gguflm.gguf.reader import GGUFFile, MetadataArray
from gguflm.model.arch import ArchSpec, RopeStyle, arch_spec

# Bounds on untrusted sizes, generous for any Llama-family model that fits in memory.
MAX_LAYERS = 512
MAX_WIDTH = 1 << 17
MAX_HEADS = 1024
MAX_CTX = 1 << 24
MAX_VOCAB = 1 << 22


@dataclass(frozen=True)
class Key:
    """One row of the key table: ``field`` <- metadata ``template`` (``{arch}`` substituted)."""

    field: str
    template: str
    kind: type  # int, float or str
    required: bool = False
    default: Any = None
    limit: int = 0  # for ints: inclusive upper bound
    lower: int = 1  # for ints: inclusive lower bound
    when: str = ""  # read only for archs whose ArchSpec has this flag set (llama.cpp reads it there only)


KEY_TABLE: tuple[Key, ...] = (
    Key("n_layer", "{arch}.block_count", int, required=True, limit=MAX_LAYERS),
    Key("n_embd", "{arch}.embedding_length", int, required=True, limit=MAX_WIDTH),
    Key("n_ff", "{arch}.feed_forward_length", int, required=True, limit=4 * MAX_WIDTH),
    Key("n_head", "{arch}.attention.head_count", int, required=True, limit=MAX_HEADS),
    Key("n_head_kv", "{arch}.attention.head_count_kv", int, limit=MAX_HEADS),      # default n_head
    Key("head_dim", "{arch}.attention.key_length", int, limit=MAX_WIDTH),          # default n_embd/n_head
    Key("head_dim_v", "{arch}.attention.value_length", int, limit=MAX_WIDTH),      # default n_embd/n_head
    Key("n_rot", "{arch}.rope.dimension_count", int, limit=MAX_WIDTH),             # default head_dim
    Key("n_ctx_train", "{arch}.context_length", int, required=True, limit=MAX_CTX),
    Key("rms_eps", "{arch}.attention.layer_norm_rms_epsilon", float, required=True),
    Key("rope_freq_base", "{arch}.rope.freq_base", float, default=10000.0),
    Key("rope_scaling_type", "{arch}.rope.scaling.type", str, default="linear"),
    Key("rope_scaling_factor", "{arch}.rope.scaling.factor", float, default=0.0),
    Key("rope_scale_linear", "{arch}.rope.scale_linear", float, default=0.0),      # older name
    Key("rope_attn_factor", "{arch}.rope.scaling.attn_factor", float, default=1.0),
    Key("vocab_size", "{arch}.vocab_size", int, limit=MAX_VOCAB),
    Key("n_ctx_orig", "{arch}.rope.scaling.original_context_length", int, limit=MAX_CTX),  # default n_ctx_train
    Key("n_swa", "{arch}.attention.sliding_window", int, default=0, limit=MAX_CTX, lower=0, when="sliding_window"),
    Key("rope_freq_base_swa", "{arch}.rope.freq_base_swa", float, default=10000.0, when="sliding_window"),
    Key("final_softcap", "{arch}.final_logit_softcapping", float, default=0.0, when="final_softcap"),
)
# Read apart from the table (an integer pattern or a per-layer array of booleans):
SWA_PATTERN_KEY = "{arch}.attention.sliding_window_pattern"

# RoPE scaling types this engine implements (llama.cpp: "none" and "linear" differ only in
# whether the factor applies; "yarn" and "longrope" need more than a scale).
SUPPORTED_ROPE_SCALING = ("none", "linear")


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of one model. ``rope_freq_scale`` is 1/factor (1.0 = unscaled);
    ``tied_output`` means the output projection reuses ``token_embd``."""

    arch: str
    rope_style: RopeStyle
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_ctx_train: int
    n_vocab: int
    rms_eps: float
    rope_freq_base: float
    rope_freq_scale: float
    rope_attn_factor: float
    tied_output: bool
    has_rope_freqs: bool
    attn_scale: float = 0.0                    # scores = q.k * attn_scale (0: 1/sqrt(head_dim))
    n_swa: int = 0                             # sliding window (keys p1 - p0 < n_swa visible); 0 = none
    swa_layers: tuple[bool, ...] = ()          # per layer: local (sliding window) or global
    rope_freq_base_swa: float = 10000.0        # RoPE base of the local layers (their freq_scale is 1)
    final_softcap: float = 0.0                 # logits = c * tanh(logits / c) when c > 0
    has_longrope: bool = False                 # Phi-3's rope_factors_long/short (see arch.py)
    n_ctx_orig: int = 0                        # longer contexts use the long factors

    @property
    def spec(self) -> ArchSpec:
        """The architecture's choices (norms, activation, fused tensors, ...)."""
        return arch_spec(self.arch)

    def is_swa(self, layer: int) -> bool:
        """True when ``layer`` attends through the sliding window."""
        return bool(self.swa_layers) and self.swa_layers[layer]

    @property
    def scale(self) -> float:
        """The attention score scale."""
        return self.attn_scale or self.head_dim ** -0.5

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelConfig:
        """Read and validate the config of ``f``; raises GGUFError naming the problem."""
        spec = arch_spec(f.architecture)
        if not f.tensors:
            raise GGUFError(f"{f.path}: has no tensors (a vocabulary-only file?); it cannot run")
        raw = read_keys(f.metadata, spec)
        return cls._build(spec, raw, f)

    @classmethod
    def _build(cls, spec: ArchSpec, raw: dict[str, Any], f: GGUFFile) -> ModelConfig:
        n_embd, n_head = raw["n_embd"], raw["n_head"]
        n_head_kv = raw["n_head_kv"] or n_head
        head_dim = raw["head_dim"] or n_embd // n_head
        head_dim_v = raw["head_dim_v"] or n_embd // n_head
        n_rot = raw["n_rot"] or head_dim
        if n_head % n_head_kv:
            raise GGUFError(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        if head_dim_v != head_dim:
            raise GGUFError(f"key_length {head_dim} != value_length {head_dim_v} (unsupported)")
        if n_rot != head_dim or n_rot % 2:
            raise GGUFError(f"rope.dimension_count {n_rot} must equal the head size {head_dim} and be even")
        scaling = raw["rope_scaling_type"]
        has_longrope = spec.longrope and all(spec.tensor_name(r) in f.tensors
                                             for r in ("rope_factors_long", "rope_factors_short"))
        if scaling == "longrope" and spec.longrope:
            pass  # no extrapolation (llama.cpp: ext_factor 0); the factors divide the frequencies
        elif scaling not in SUPPORTED_ROPE_SCALING:
            raise GGUFError(f"RoPE scaling type {scaling!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_ROPE_SCALING)})")
        if raw["rope_freq_base"] <= 0:
            raise GGUFError(f"rope.freq_base {raw['rope_freq_base']} must be positive")
        factor = raw["rope_scaling_factor"] or raw["rope_scale_linear"]
        freq_scale = 1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor

        embd = spec.tensor_name("token_embd")
        if embd not in f.tensors:
            raise GGUFError(f"missing tensor {embd!r}")
        n_vocab = f.tensors[embd].shape[-1]
        if raw["vocab_size"] is not None and raw["vocab_size"] != n_vocab:
            raise GGUFError(f"{spec.name}.vocab_size {raw['vocab_size']} != {n_vocab} rows of {embd!r}")
        if not 1 <= n_vocab <= MAX_VOCAB:
            raise GGUFError(f"vocabulary size {n_vocab} out of range")
        tied = spec.tensor_name("output") not in f.tensors
        n_layer = raw["n_layer"]
        # Gemma 3: 1/sqrt(head_dim), except its 27B (llama.cpp: type == LLM_TYPE_27B)
        attn_scale = (n_embd // n_head) ** -0.5 if n_layer in spec.attn_scale_by_embd else 0.0
        n_swa = raw["n_swa"] or 0
        swa_layers = _swa_layers(f.metadata, spec, n_layer) if n_swa else ()
        if raw["rope_freq_base_swa"] <= 0:
            raise GGUFError(f"rope.freq_base_swa {raw['rope_freq_base_swa']} must be positive")
        return cls(
            arch=spec.name, rope_style=spec.rope,
            n_layer=raw["n_layer"], n_embd=n_embd, n_ff=raw["n_ff"], n_head=n_head, n_head_kv=n_head_kv,
            head_dim=head_dim, n_rot=n_rot, n_ctx_train=raw["n_ctx_train"], n_vocab=n_vocab,
            rms_eps=raw["rms_eps"], rope_freq_base=raw["rope_freq_base"], rope_freq_scale=freq_scale,
            rope_attn_factor=raw["rope_attn_factor"], tied_output=tied,
            has_rope_freqs=spec.tensor_name("rope_freqs") in f.tensors,
            attn_scale=attn_scale, n_swa=n_swa if any(swa_layers) else 0, swa_layers=swa_layers,
            rope_freq_base_swa=raw["rope_freq_base_swa"], final_softcap=raw["final_softcap"] or 0.0,
            has_longrope=has_longrope, n_ctx_orig=raw["n_ctx_orig"] or raw["n_ctx_train"],
        )


def _swa_layers(metadata: Mapping[str, Any], spec: ArchSpec, n_layer: int) -> tuple[bool, ...]:
    """Which layers are local: the file's per-layer array, or llama.cpp's ``set_swa_pattern``
    of its integer pattern (default ``spec.swa_pattern``): with pattern n, layer il is local
    unless il % n == n - 1 (n = 0: every layer local)."""
    key = SWA_PATTERN_KEY.format(arch=spec.name)
    value = metadata.get(key, spec.swa_pattern)
    if isinstance(value, (list, MetadataArray)):
        value = list(value)
        if len(value) != n_layer or not all(isinstance(v, bool) for v in value):
            raise GGUFError(f"{key!r}: expected {n_layer} booleans (one per layer)")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LAYERS:
        raise GGUFError(f"{key!r} = {value!r}: expected an integer in [0, {MAX_LAYERS}]")
    return tuple(value == 0 or il % value < value - 1 for il in range(n_layer))


def read_keys(metadata: Mapping[str, Any], spec: ArchSpec | str) -> dict[str, Any]:
    """Every KEY_TABLE field from ``metadata``: checked values, defaults, or GGUFError.
    Keys the architecture does not read take their defaults."""
    if isinstance(spec, str):
        spec = arch_spec(spec)
    arch = spec.name
    out: dict[str, Any] = {}
    for k in KEY_TABLE:
        key = k.template.format(arch=arch)
        if k.when and not getattr(spec, k.when):
            out[k.field] = k.default
            continue
        if key not in metadata:
            if k.required:
                raise GGUFError(f"missing metadata key {key!r}")
            out[k.field] = k.default
            continue
        out[k.field] = _check(key, metadata[key], k)
    return out


def _check(key: str, value: Any, k: Key) -> Any:
    if k.kind is int:
        if isinstance(value, (list, MetadataArray)):  # per-layer arrays (get_key_or_arr): uniform only
            value = list(value)
            if not value or any(v != value[0] for v in value):
                raise GGUFError(f"{key!r}: per-layer values {value[:8]}... are not supported")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int) or not k.lower <= value <= k.limit:
            raise GGUFError(f"{key!r} = {value!r}: expected an integer in [{k.lower}, {k.limit}]")
        return value
    if k.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise GGUFError(f"{key!r} = {value!r}: expected a finite non-negative number")
        return float(value)
    if not isinstance(value, str):
        raise GGUFError(f"{key!r} = {value!r}: expected a string")
    return value
