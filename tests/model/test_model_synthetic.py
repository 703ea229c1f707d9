"""Synthetic models of real shapes, written with gguf-py's GGUFWriter (random weights,
2 layers) and quantized to Q4_K_M by llama.cpp's own quantizer (their widths are multiples
of 256, so K-quants are really used, unlike SmolLM2's 576):

* TinyLlama-1.1B-shaped: 2048 wide, 32 heads / 4 KV heads (head size 64), FFN 5632,
  Llama 2's SentencePiece vocabulary, the output tied to the embedding (half the bytes);
* Llama-3-shaped: head size 128, 8 heads / 2 KV heads, rope_freqs (Llama 3.1's divisors),
  freq_base 500000, Llama 3's BPE vocabulary trimmed to 8192 tokens.

For each, on random token ids: the float64 reference against llama.cpp run without
rounding (its own dequantization of the file, float32 compute, float32 KV cache) — they
agree to ~1e-11 in KL — and against llama.cpp as it runs the file (reported), then our
logits against the reference. The weights are scaled for peaked attention
and logits spread over several units, so a wrong RoPE pairing or head mapping shows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from oracles import kl_rows, llama_cpp_logits, top1
from synth import Shape, llama3_rope_freqs, write_llama

import gguflm
from gguflm.verify.reference import reference_logits

CACHE = Path(os.environ.get("GGUFLM_TEST_CACHE", Path.home() / ".cache" / "gguflm-tests"))
VERSION = "v1"  # bump when synth.py changes what it writes

SHAPES = {
    "tinyllama": (Shape(n_embd=2048, n_head=32, n_head_kv=4, n_ff=5632, n_layer=2, n_ctx=2048, tied=True),
                  "ggml-vocab-llama-spm.gguf"),
    "llama3": (Shape(n_embd=1024, n_head=8, n_head_kv=2, n_ff=3584, n_layer=2, n_ctx=8192, head_dim=128,
                     freq_base=500000.0, rope_freqs=llama3_rope_freqs(128, 500000.0), n_vocab=8192),
               "ggml-vocab-llama-bpe.gguf"),
}
N_TOKENS = 48


@pytest.fixture(scope="module")
def synthetic(shared_dir, llama_quantize):
    """name -> {"F16": path, "Q4_K_M": path}, written once and cached on disk."""
    out = {}
    CACHE.mkdir(parents=True, exist_ok=True)
    for name, (shape, vocab) in SHAPES.items():
        f16 = CACHE / f"synthetic-{name}-{VERSION}.F16.gguf"
        if not f16.exists():
            tmp = f16.with_suffix(".tmp")
            write_llama(tmp, shape, shared_dir / "vocab" / vocab, seed=1)
            tmp.rename(f16)
        out[name] = {"F16": f16, "Q4_K_M": llama_quantize(f16, "Q4_K_M")}
    return out


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_synthetic_model(name, quant, synthetic, llama_cpp, llama_quantize):
    path = synthetic[name][quant]
    f = gguflm.GGUFFile(path)
    if quant == "Q4_K_M":
        types = {info.ggml_type.name for info in f.tensors.values()}
        assert {"Q4_K", "Q6_K"} <= types, types
    n_vocab = f.tensors["token_embd.weight"].shape[1]
    ids = np.random.default_rng(5).integers(0, n_vocab, N_TOKENS).tolist()
    ref = reference_logits(f, ids)
    # llama.cpp without rounding: its own dequantization of this file (its quantizer's F32
    # output) computed in float32 with a float32 KV cache
    exact = llama_cpp_logits(llama_cpp, llama_quantize(path, "F32"), ids, f32_cache=True)
    lc = llama_cpp_logits(llama_cpp, path, ids)                # as llama.cpp runs this file
    model = gguflm.load(path, n_ctx=64)
    ours = model.logits(ids).numpy()
    kl_exact, kl_lc, kl_ours = kl_rows(ref, exact), kl_rows(ref, lc), kl_rows(ref, ours)
    spread = ref.std(axis=-1).mean()
    print(f"\n{name} {quant}: logit std {spread:.1f}; KL(ref || llama.cpp unrounded) mean {kl_exact.mean():.1e}; "
          f"KL(ref || llama.cpp) mean {kl_lc.mean():.1e} top-1 {top1(ref, lc):.3f}; "
          f"KL(ref || ours) mean {kl_ours.mean():.1e} max {kl_ours.max():.1e} top-1 {top1(ref, ours):.3f}")
    assert spread > 2.0                        # logits far from uniform: the comparison has teeth
    assert kl_exact.max() < 1e-8               # the reference is what llama.cpp computes
    assert kl_lc.mean() < 0.1                  # llama.cpp's own rounding (f16 cache, 8-bit activations)
    assert kl_ours.mean() < 1e-4 and kl_ours.max() < 1e-3
    assert top1(ref, ours) == 1.0
    if name == "llama3":
        assert model.config.has_rope_freqs and model.config.head_dim == 128
