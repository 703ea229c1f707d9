"""Synthetic GGUF files written with the official `gguf` package's GGUFWriter in an
architecture's exact tensor names and metadata (llama.cpp's ``LLM_TENSOR_NAMES`` and
``load_arch_tensors``): random weights, tokenizer fields copied from a vocabulary file of
../shared. ``llama`` (and Mistral-shaped llama), ``qwen2`` (QKV biases), ``qwen3`` (q/k
norms), ``phi3`` (fused ``attn_qkv``, ``ffn_up`` holding gate and up) and ``gemma3``
(q/k norms, post norms, sliding window).

The weights are scaled so that attention is peaked and logits spread over several units:
a wrong RoPE pairing, head mapping or norm then moves the logits far more than rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LLAMA3_SPECIALS = 256  # Llama 3 keeps its special tokens in the last 256 ids


@dataclass
class Shape:
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_layer: int = 2
    n_ctx: int = 256
    head_dim: int | None = None          # written as key/value_length when set
    freq_base: float = 10000.0
    rope_freqs: np.ndarray | None = None  # Llama 3 per-frequency divisors, [head_dim/2]
    tied: bool = False                    # no output.weight
    n_vocab: int | None = None            # trim a BPE vocabulary (keeping its last 256 specials)
    extra_keys: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (value, GGUFValueType)
    omit_keys: tuple[str, ...] = ()
    omit_tensors: tuple[str, ...] = ()
    bad_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensor -> numpy shape
    n_swa: int = 0                        # gemma3: attention.sliding_window
    longrope: bool = False                # phi3: rope_factors_long/short (random in [1, 4]) + longrope keys
    extra_tensors: dict[str, int] = field(default_factory=dict)  # name -> length of an extra F32 vector


def llama3_rope_freqs(head_dim: int, base: float, factor: float = 8.0, low: float = 1.0,
                      high: float = 4.0, orig_ctx: int = 8192) -> np.ndarray:
    """The divisors convert_hf_to_gguf.py writes for rope_type "llama3" (as in transformers)."""
    import math

    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wavelen, high_wavelen = orig_ctx / low, orig_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (orig_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _tokenizer_fields(vocab_path: Path, n_vocab: int | None) -> tuple[dict[str, tuple[Any, Any, Any]], int]:
    """(key -> (value, type, sub_type)) of the tokenizer.* fields, and the vocabulary size."""
    import gguf

    import gguflm

    f = gguflm.GGUFFile(vocab_path)
    out = {}
    for key, value in f.metadata.items():
        if not key.startswith("tokenizer."):
            continue
        types = f.metadata_types[key]
        vtype = gguf.GGUFValueType(int(types[0]))
        sub = gguf.GGUFValueType(int(types[1])) if len(types) > 1 else None
        out[key] = [value, vtype, sub]
    tokens = out["tokenizer.ggml.tokens"][0]
    if n_vocab is not None and n_vocab < len(tokens):
        keep = list(range(n_vocab - LLAMA3_SPECIALS)) + list(range(len(tokens) - LLAMA3_SPECIALS, len(tokens)))
        remap = {old: new for new, old in enumerate(keep)}
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            if key in out:
                out[key][0] = [out[key][0][i] for i in keep]
        kept = set(out["tokenizer.ggml.tokens"][0])
        if "tokenizer.ggml.merges" in out:
            out["tokenizer.ggml.merges"][0] = [
                m for m in out["tokenizer.ggml.merges"][0]
                if all(p in kept for p in m.split(" ", 1)) and m.replace(" ", "", 1) in kept]
        for key in [k for k in out if k.endswith("_token_id")]:
            out[key][0] = remap.get(out[key][0], 0)
    return {k: tuple(v) for k, v in out.items()}, len(out["tokenizer.ggml.tokens"][0])


def write_llama(path: Path, shape: Shape, vocab_path: Path, seed: int = 0,
                dtype: type = np.float16, arch: str = "llama") -> Path:
    """Write a random ``arch`` model of ``shape`` to ``path`` (F16 weights, F32 norms)."""
    import gguf

    rng = np.random.default_rng(seed)
    tok_fields, n_vocab = _tokenizer_fields(vocab_path, shape.n_vocab)
    E, H, Hkv = shape.n_embd, shape.n_head, shape.n_head_kv
    D = shape.head_dim or E // H
    w = gguf.GGUFWriter(str(path), arch)
    keys: dict[str, tuple[Any, Any, Any]] = {
        f"{arch}.block_count": (shape.n_layer, gguf.GGUFValueType.UINT32, None),
        f"{arch}.context_length": (shape.n_ctx, gguf.GGUFValueType.UINT32, None),
        f"{arch}.embedding_length": (E, gguf.GGUFValueType.UINT32, None),
        f"{arch}.feed_forward_length": (shape.n_ff, gguf.GGUFValueType.UINT32, None),
        f"{arch}.attention.head_count": (H, gguf.GGUFValueType.UINT32, None),
        f"{arch}.attention.head_count_kv": (Hkv, gguf.GGUFValueType.UINT32, None),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, gguf.GGUFValueType.FLOAT32, None),
        f"{arch}.rope.freq_base": (shape.freq_base, gguf.GGUFValueType.FLOAT32, None),
        f"{arch}.rope.dimension_count": (D, gguf.GGUFValueType.UINT32, None),
        f"{arch}.vocab_size": (n_vocab, gguf.GGUFValueType.UINT32, None),
        "general.file_type": (1, gguf.GGUFValueType.UINT32, None),
        **tok_fields,
    }
    if shape.head_dim:
        keys[f"{arch}.attention.key_length"] = (D, gguf.GGUFValueType.UINT32, None)
        keys[f"{arch}.attention.value_length"] = (D, gguf.GGUFValueType.UINT32, None)
    for k, (v, t) in shape.extra_keys.items():
        keys[k] = (v, t, None)
    for k, (v, t, sub) in keys.items():
        if k not in shape.omit_keys:
            w.add_key_value(k, v, t, sub)

    def dense(name: str, n_out: int, n_in: int, gain: float = 1.0) -> None:
        add(name, (rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(gain / np.sqrt(n_in))).astype(dtype))

    def norm(name: str) -> None:
        add(name, (1.0 + 0.1 * rng.standard_normal(E)).astype(np.float32))

    def add(name: str, arr: np.ndarray) -> None:
        if name in shape.omit_tensors:
            return
        if name in shape.bad_shapes:
            arr = np.zeros(shape.bad_shapes[name], dtype=arr.dtype)
        w.add_tensor(name, arr)

    emb_std = np.float32(4.0 / np.sqrt(E) if shape.tied else 1.0)  # tied: it is the output projection too
    if arch == "gemma3":  # the graph multiplies the rows by sqrt(E): keep the residual stream at ~1
        emb_std = np.float32(emb_std / np.sqrt(E))
    add("token_embd.weight", (rng.standard_normal((n_vocab, E), dtype=np.float32) * emb_std).astype(dtype))
    norm("output_norm.weight")
    if not shape.tied:
        dense("output.weight", n_vocab, E, gain=4.0)
    if shape.rope_freqs is not None:
        add("rope_freqs.weight", shape.rope_freqs.astype(np.float32))
    if shape.longrope:
        for which in ("long", "short"):
            add(f"rope_factors_{which}.weight", (1.0 + 3.0 * rng.random(D // 2)).astype(np.float32))
        w.add_key_value(f"{arch}.rope.scaling.type", "longrope", gguf.GGUFValueType.STRING, None)
        w.add_key_value(f"{arch}.rope.scaling.attn_factor", 1.19, gguf.GGUFValueType.FLOAT32, None)
        w.add_key_value(f"{arch}.rope.scaling.original_context_length", 4096, gguf.GGUFValueType.UINT32, None)
    for name, n in shape.extra_tensors.items():
        add(name, np.ones(n, dtype=np.float32))
    if arch == "gemma3" and shape.n_swa:
        w.add_key_value(f"{arch}.attention.sliding_window", shape.n_swa, gguf.GGUFValueType.UINT32, None)
    for b in range(shape.n_layer):
        p = f"blk.{b}."
        norm(p + "attn_norm.weight")
        if arch == "phi3":  # [Wq; Wk; Wv] in one tensor (rows of each scaled as the separate ones)
            add(p + "attn_qkv.weight", np.concatenate([
                rng.standard_normal((H * D, E), dtype=np.float32) * np.float32(3.0 / np.sqrt(E)),
                rng.standard_normal((Hkv * D, E), dtype=np.float32) * np.float32(3.0 / np.sqrt(E)),
                rng.standard_normal((Hkv * D, E), dtype=np.float32) * np.float32(1.0 / np.sqrt(E))]).astype(dtype))
        else:
            dense(p + "attn_q.weight", H * D, E, gain=3.0)
            dense(p + "attn_k.weight", Hkv * D, E, gain=3.0)
            dense(p + "attn_v.weight", Hkv * D, E)
        if arch == "qwen2":
            for c, n in (("q", H * D), ("k", Hkv * D), ("v", Hkv * D)):
                add(p + f"attn_{c}.bias", (0.5 * rng.standard_normal(n)).astype(np.float32))
        if arch in ("qwen3", "gemma3"):
            for c in "qk":
                add(p + f"attn_{c}_norm.weight", (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))
        dense(p + "attn_output.weight", E, H * D)
        norm(p + "ffn_norm.weight")
        if arch == "phi3":
            dense(p + "ffn_up.weight", 2 * shape.n_ff, E)
        else:
            dense(p + "ffn_gate.weight", shape.n_ff, E)
            dense(p + "ffn_up.weight", shape.n_ff, E)
        dense(p + "ffn_down.weight", E, shape.n_ff)
        if arch == "gemma3":
            norm(p + "post_attention_norm.weight")
            norm(p + "post_ffw_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CACHE = Path(os.environ.get("GGUFLM_TEST_CACHE", Path.home() / ".cache" / "gguflm-tests"))
SYNTH_VERSION = "v2"  # bump when write_llama changes what it writes for ARCHS

# name -> (shape, vocabulary file of ../shared/vocab, GGUF architecture): widths multiples
# of 256 (K-quants apply), logits spread over several units, 24-token prompts.
ARCHS: dict[str, tuple[Shape, str, str]] = {
    "qwen2": (Shape(n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_layer=2, n_ctx=512, freq_base=1e6,
                    n_vocab=4096), "ggml-vocab-qwen2.gguf", "qwen2"),
    "qwen3": (Shape(n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_layer=2, n_ctx=512, head_dim=128,
                    freq_base=1e6, n_vocab=4096), "ggml-vocab-qwen2.gguf", "qwen3"),
    "phi3": (Shape(n_embd=256, n_head=4, n_head_kv=4, n_ff=512, n_layer=2, n_ctx=512),
             "ggml-vocab-phi-3.gguf", "phi3"),
    # Phi-3.5 / 128k: long and short RoPE factors, longrope scaling with attn_factor (contexts <= 4096: short)
    "phi3-longrope": (Shape(n_embd=256, n_head=4, n_head_kv=4, n_ff=512, n_layer=2, n_ctx=8192, longrope=True),
                      "ggml-vocab-phi-3.gguf", "phi3"),
    # 6 layers: llama.cpp's default pattern makes layer 5 global, 0-4 local (window 8)
    "gemma3": (Shape(n_embd=256, n_head=4, n_head_kv=1, n_ff=512, n_layer=6, n_ctx=512, head_dim=256,
                     freq_base=1e6, n_swa=8), "ggml-vocab-llama-spm.gguf", "gemma3"),
    # a llama-architecture model of Mistral's shape: GQA 8:1, head size 128
    "mistral": (Shape(n_embd=1024, n_head=16, n_head_kv=2, n_ff=1024, n_layer=2, n_ctx=512, head_dim=128),
                "ggml-vocab-llama-spm.gguf", "llama"),
}


def synthetic_f16(name: str, vocab_dir: Path) -> Path:
    """The F16 file of ``ARCHS[name]``, written once (seed 3) and cached on disk."""
    shape, vocab, arch = ARCHS[name]
    f16 = CACHE / f"synthetic-{name}-{SYNTH_VERSION}.F16.gguf"
    if not f16.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = f16.with_suffix(f".{os.getpid()}.tmp")
        write_llama(tmp, shape, vocab_dir / vocab, seed=3, arch=arch)
        tmp.rename(f16)
    return f16
