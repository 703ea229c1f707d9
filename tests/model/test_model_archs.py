"""Every architecture besides Llama and the real Gemma 3, on small random-weight models in
that architecture's exact tensor names and metadata (synth.py; vocabularies of ../shared),
quantized by llama.cpp's own quantizer to Q4_K_M, Q4_0 and Q8_0 (widths multiples of 256,
so K-quants are really used):

* qwen2 (Qwen2 / Qwen2.5: NEOX RoPE, QKV biases), Qwen2's BPE vocabulary;
* qwen3 (q/k RMSNorm before RoPE), Qwen2's vocabulary;
* phi3 (fused ``attn_qkv``, ``ffn_up`` holding gate and up), Phi-3's SPM vocabulary; and
  phi3-longrope (Phi-3.5's long/short RoPE factors, longrope scaling, attn_factor);
* gemma3 (GeGLU, post norms, q/k norms, sqrt(n_embd) scale, a sliding window of 8 over 24
  tokens so local layers really mask), Llama's SPM vocabulary (the real Gemma 3 file has
  its own test);
* mistral: a llama-architecture model of Mistral's shape (GQA 8:1, head size 128).

For each: the float64 reference against llama.cpp without rounding (the file requantized
to F32 by llama.cpp, float32 compute and KV cache), then for each quantization our logits
against the reference (KL <= 1e-6, top-1 identical) with llama.cpp's own distance
reported; and transformers' ``from_pretrained(..., gguf_file=...)`` float32 forward on the
F16 file as a second, independent oracle where transformers reads that architecture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from oracles import kl_rows, llama_cpp_logits, top1
from synth import ARCHS, synthetic_f16

import gguflm
from gguflm.verify.reference import reference_logits

QUANTS = ["Q4_K_M", "Q4_0", "Q8_0"]
N_TOKENS = 24
# transformers' GGUF loader (integrations/ggml.py) reads these architectures
TRANSFORMERS_ARCHS = {"qwen2", "qwen3", "phi3", "gemma3", "mistral"}


@pytest.fixture(scope="module")
def models(shared_dir):
    """arch name -> {"F16": path}, written once and cached on disk."""
    return {name: {"F16": synthetic_f16(name, shared_dir / "vocab")} for name in ARCHS}


def _ids(path: Path) -> list[int]:
    n_vocab = gguflm.GGUFFile(path).tensors["token_embd.weight"].shape[1]
    return np.random.default_rng(7).integers(0, n_vocab, N_TOKENS).tolist()


@pytest.mark.parametrize("name", list(ARCHS))
def test_reference_is_llama_cpp_unrounded(name, models, llama_cpp, llama_quantize):
    path = models[name]["F16"]
    ids = _ids(path)
    ref = reference_logits(path, ids)
    exact = llama_cpp_logits(llama_cpp, llama_quantize(path, "F32"), ids, f32_cache=True)
    kl = kl_rows(ref, exact)
    spread = ref.std(axis=-1).mean()
    print(f"\n{name} F16 as F32: logit std {spread:.1f}; KL(ref || llama.cpp unrounded) mean {kl.mean():.1e} "
          f"max {kl.max():.1e} top-1 {top1(ref, exact):.3f}")
    assert spread > 2.0                   # logits far from uniform: the comparison has teeth
    # gemma3: llama.cpp's GELU reads a float16 table (see test_model_gemma3); the others are exact
    assert kl.max() < (1e-4 if name == "gemma3" else 1e-8)
    assert top1(ref, exact) == 1.0


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_match_reference(name, quant, models, llama_cpp, llama_quantize):
    path = llama_quantize(models[name]["F16"], quant)
    if quant == "Q4_K_M":
        types = {info.ggml_type.name for info in gguflm.GGUFFile(path).tensors.values()}
        assert "Q4_K" in types, types
    ids = _ids(path)
    model = gguflm.load(path, n_ctx=64).model
    assert model.config.arch == ARCHS[name][2]
    from gguflm.kernels.cpu.block import FusedBlock

    # every architecture's block runs as the C++ block step (the CPU kernels cover these types)
    assert all(isinstance(b, FusedBlock) for b in model.transformer.blocks), name
    ours = model.logits(ids).numpy()
    ref = reference_logits(path, ids)
    lc = llama_cpp_logits(llama_cpp, path, ids)
    kl_ours, kl_lc = kl_rows(ref, ours), kl_rows(ref, lc)
    print(f"\n{name} {quant}: KL(ref || ours) mean {kl_ours.mean():.1e} max {kl_ours.max():.1e} "
          f"top-1 {top1(ref, ours):.3f} | KL(ref || llama.cpp) mean {kl_lc.mean():.1e} top-1 {top1(ref, lc):.3f}")
    assert kl_ours.mean() <= 1e-6 and kl_ours.max() < 1e-5
    assert top1(ref, ours) == 1.0
    # one decode step through the KV cache agrees with the full forward
    cache = model.new_cache(1, n_ctx=N_TOKENS)
    import torch

    model.forward(torch.tensor([ids[:-1]]), torch.arange(N_TOKENS - 1)[None], cache, torch.zeros(1, dtype=torch.long))
    step = model.forward(torch.tensor([[ids[-1]]]), torch.tensor([[N_TOKENS - 1]]), cache,
                         torch.zeros(1, dtype=torch.long), last_only=True)[0].numpy()
    assert kl_rows(ref[-1:], step[None])[0] < 1e-6


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_ARCHS & set(ARCHS)))
def test_transformers_agrees_with_reference(name, models, tmp_path):
    """transformers dequantizes the F16 file to float32 and runs its own implementation."""
    transformers = pytest.importorskip("transformers")
    import torch

    path = models[name]["F16"]
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               torch_dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        pytest.skip(f"transformers cannot load a {name} GGUF here: {str(e).splitlines()[0][:200]}")
    ids = _ids(path)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].double().numpy()
    ref = reference_logits(path, ids)
    kl = kl_rows(ref, theirs)
    print(f"\n{name} F16: KL(ref || transformers float32) mean {kl.mean():.1e} max {kl.max():.1e} "
          f"top-1 {top1(ref, theirs):.3f}")
    assert kl.max() < 1e-5
    assert top1(ref, theirs) == 1.0
