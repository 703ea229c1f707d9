"""The forward pass against llama.cpp and the float64 reference, on SmolLM2 and its
requantizations made by llama.cpp's own quantizer.

1. The float64 reference is first shown to compute what llama.cpp computes: on the F16
   file, along a chat prompt and llama.cpp's greedy continuation, mean KL < 1e-5; and on
   the Q4_1 file run by llama.cpp without rounding (F32 weights from its own dequantization,
   float32 KV cache), KL < 1e-8 at every position.
2. Then our engine against the reference, for each quantization, along the chat prompt
   and OUR greedy continuation (decoded token by token through the KV cache): mean KL
   < 1e-4, top-1 >= 99.5 %, every greedy token the reference's argmax — and ours at least
   10x closer to the exact result than llama.cpp (which rounds activations to 8 bits).
"""

from __future__ import annotations

import pytest
from oracles import PROMPTS, kl_rows, llama_cpp_greedy, llama_cpp_logits, top1

import gguflm
from gguflm.engine import SamplingParams
from gguflm.verify.reference import reference_logits

QUANTS = ["Q4_1", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q3_K_M", "IQ4_NL"]
N_GEN = 80


def chat_ids(path, question: str) -> list[int]:
    tok = gguflm.Tokenizer.from_gguf(path)
    text = gguflm.ChatTemplate.from_gguf(path).render([{"role": "user", "content": question}])
    return tok.encode(text, add_special=True, parse_special=True)


def test_reference_agrees_with_llama_cpp_on_f16(requantized, llama_cpp):
    path = requantized("F16")
    ids = chat_ids(path, PROMPTS[1])
    eog = set(gguflm.Tokenizer.from_gguf(path).eog_ids)
    ids += llama_cpp_greedy(llama_cpp, path, ids, 64, eog)
    ref = reference_logits(path, ids)
    lc = llama_cpp_logits(llama_cpp, path, ids)
    kl = kl_rows(ref, lc)
    print(f"\nF16, {len(ids)} positions: KL(reference || llama.cpp) mean {kl.mean():.2e} max {kl.max():.2e}, "
          f"top-1 {top1(ref, lc):.3f}")
    assert kl.mean() < 1e-5
    assert top1(ref, lc) >= 0.99


def test_reference_is_llama_cpp_without_rounding(smollm2_path, llama_quantize, llama_cpp):
    """On the Q4_1 file itself: llama.cpp's own dequantization of it (its quantizer's F32
    output), computed in float32 with a float32 KV cache, is the reference up to float32."""
    ids = chat_ids(smollm2_path, PROMPTS[2])
    ref = reference_logits(smollm2_path, ids)
    exact = llama_cpp_logits(llama_cpp, llama_quantize(smollm2_path, "F32"), ids, f32_cache=True)
    kl = kl_rows(ref, exact)
    print(f"\nQ4_1 as F32, float32 cache, {len(ids)} positions: KL(reference || llama.cpp) mean {kl.mean():.2e} "
          f"max {kl.max():.2e}")
    assert kl.max() < 1e-8
    assert top1(ref, exact) == 1.0


@pytest.mark.parametrize("quant", QUANTS)
def test_logits_match_reference(quant, smollm2_path, requantized, llama_cpp):
    path = smollm2_path if quant == "Q4_1" else requantized(quant)
    model = gguflm.load(path, n_ctx=256)
    prompt = chat_ids(path, PROMPTS[QUANTS.index(quant) % len(PROMPTS)])
    stream = model.stream(prompt, N_GEN, SamplingParams(temperature=0))
    list(stream)
    generated = stream.result.tokens
    ids = prompt + generated
    ours = model.logits(ids).numpy()
    eog = set(model.tokenizer.eog_ids)
    del model
    ref = reference_logits(path, ids)
    lc = llama_cpp_logits(llama_cpp, path, ids)
    kl_ours, kl_lc = kl_rows(ref, ours), kl_rows(ref, lc)
    print(f"\n{quant}, {len(ids)} positions: KL(ref || ours) mean {kl_ours.mean():.2e} max {kl_ours.max():.2e}"
          f" top-1 {top1(ref, ours):.4f} | KL(ref || llama.cpp) mean {kl_lc.mean():.2e} max {kl_lc.max():.2e}"
          f" top-1 {top1(ref, lc):.4f}")
    assert kl_ours.mean() < 1e-4
    assert top1(ref, ours) >= 0.995
    assert kl_ours.mean() * 10 < kl_lc.mean()
    # the KV-cached decode followed the reference's own greedy path
    ref_next = ref[len(prompt) - 1:len(ids) - 1].argmax(-1)
    assert ref_next.tolist() == generated
    if stream.result.finish_reason == "stop":  # stopped on an end-of-generation token: so would the reference
        assert int(ref[-1].argmax()) in eog
