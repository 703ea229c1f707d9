"""The real Gemma 3 270M (Q4_K_M) against llama.cpp and the float64 reference.

Gemma 3 differs from Llama in every place ArchSpec describes: GeGLU (GELU-tanh), post-
attention and post-FFN norms, q/k RMSNorm, sqrt(n_embd) embedding scale, NEOX RoPE, local
layers (sliding window 512, RoPE base 10000) between global ones (every 6th, base 1e6),
a 262k-token SentencePiece vocabulary.

1. Tokenizer ids identical to llama.cpp's ``llama_tokenize`` on a few dozen strings.
2. The float64 reference is what llama.cpp computes: on the file requantized to F32 by
   llama.cpp's own quantizer (its own dequantization, float32 compute, float32 KV cache)
   mean KL ~4e-7. Not ~1e-11 as for SiLU models: llama.cpp's CPU GELU reads a float16
   lookup table (``GGML_GELU_FP16`` in ggml-cpu/vec.h), so its GELU input is rounded to
   11 bits — llama.cpp's own rounding, which the reference does not imitate.
3. Our logits against the reference along a chat prompt and our greedy continuation:
   mean KL <= 1e-6, top-1 identical, every greedy token the reference's argmax; llama.cpp
   on the same file (8-bit activations) reported, and ours at least 10x closer.
4. ``gguflm run --temp 0`` prints exactly the text of that verified greedy sequence.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from oracles import kl_rows, llama_cpp_logits, top1

import gguflm
from gguflm.engine import SamplingParams
from gguflm.verify.reference import reference_logits

GEMMA3 = Path(os.environ.get("GGUFLM_GEMMA3", Path.home() / ".cache" / "gguflm" / "models"
                             / "gemma-3-270m-q4_k_m.gguf"))
QUESTION = "Write a short poem about the sea."
N_GEN = 40

STRINGS = [
    "Hello world", " Hello world", "Hello  world", "hello\nworld", "\n\n\n", "   leading spaces",
    "The quick brown fox jumps over the lazy dog.", "Is Paris the capital of France?",
    "naïve café Straße İstanbul", "привет мир", "Ελλάδα", "日本語のテキスト", "中文文本", "한국어",
    "ไทย", "हिन्दी", "العربية", "emoji 😀👍🏽🦙", "def f(x):\n    return x + 1\n", "x = [1, 2, 3]",
    "1234567890", "3.14159", "$100.00 €50", "<start_of_turn>user\nhi<end_of_turn>\n",
    "<bos>text", "a\tb\tc", "it's we're they'll", "UPPER lower MiXeD", "....!!!???", "\u200b\u00a0\u3000",
    "<unused0> <mask>", "http://example.com/path?q=1", "  ", "",
]


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    if not GEMMA3.exists():
        pytest.skip(f"Gemma 3 270M not found at {GEMMA3} (set GGUFLM_GEMMA3)")
    return GEMMA3


@pytest.fixture(scope="module")
def gemma3_model(gemma3_path):
    return gguflm.load(gemma3_path, n_ctx=256)


@pytest.fixture(scope="module")
def prompt_ids(gemma3_model):
    text = gemma3_model.chat_template.render([{"role": "user", "content": QUESTION}])
    return gemma3_model.encode_prompt(text)


@pytest.fixture(scope="module")
def verified_greedy(gemma3_model, gemma3_path, prompt_ids, weight_source, llama_cpp):
    """Our greedy continuation of the chat prompt, with the logit comparisons along it."""
    stream = gemma3_model.stream(prompt_ids, N_GEN, SamplingParams(temperature=0))
    list(stream)
    generated = stream.result.tokens
    ids = prompt_ids + generated
    ours = gemma3_model.logits(ids).numpy()
    ref = reference_logits(gemma3_path, ids, weights=weight_source(gemma3_path))
    lc = llama_cpp_logits(llama_cpp, gemma3_path, ids)
    return {"generated": generated, "finish": stream.result.finish_reason, "ids": ids,
            "ours": ours, "ref": ref, "lc": lc}


def test_gemma3_config(gemma3_model):
    c = gemma3_model.config
    assert (c.arch, c.n_layer, c.n_embd, c.head_dim, c.n_head, c.n_head_kv) == ("gemma3", 18, 640, 256, 4, 1)
    assert c.n_swa == 512 and c.rope_freq_base_swa == 10000.0 and c.rope_freq_base == 1e6
    # llama.cpp's set_swa_pattern(6): layers 5, 11, 17 global
    assert [i for i, local in enumerate(c.swa_layers) if not local] == [5, 11, 17]
    # every block runs as the CPU's C++ block step, composed from Gemma's choices
    from gguflm.kernels.cpu.block import FusedBlock

    assert all(isinstance(b, FusedBlock) for b in gemma3_model.model.transformer.blocks)


def test_gemma3_tokenizer_matches_llama_cpp(gemma3_path, llama_cpp):
    ours = gguflm.Tokenizer.from_gguf(gemma3_path)
    theirs = llama_cpp.Llama(str(gemma3_path), vocab_only=True, verbose=False)
    assert ours.n_vocab == theirs.n_vocab() == 262144
    try:
        for text in STRINGS:
            for add_special in (False, True):
                for parse_special in (False, True):
                    expect = theirs.tokenize(text.encode(), add_bos=add_special, special=parse_special)
                    got = ours.encode(text, add_special=add_special, parse_special=parse_special)
                    assert got == expect, (text, add_special, parse_special)
    finally:
        theirs.close()


def test_gemma3_reference_is_llama_cpp_unrounded(gemma3_path, prompt_ids, llama_quantize, llama_cpp,
                                                  weight_source):
    ids = prompt_ids + gguflm.Tokenizer.from_gguf(gemma3_path).encode(
        " The sea is wide, the wind is loud, and the gulls cry over the grey water.", add_special=False)
    ref = reference_logits(gemma3_path, ids, weights=weight_source(gemma3_path))
    exact = llama_cpp_logits(llama_cpp, llama_quantize(gemma3_path, "F32"), ids, f32_cache=True)
    kl = kl_rows(ref, exact)
    print(f"\nGemma 3 as F32, float32 cache, {len(ids)} positions: KL(reference || llama.cpp) "
          f"mean {kl.mean():.2e} max {kl.max():.2e}, top-1 {top1(ref, exact):.3f}")
    assert kl.mean() < 5e-6 and kl.max() < 5e-5   # llama.cpp's float16 GELU table, see the docstring
    assert top1(ref, exact) == 1.0


def test_gemma3_logits_match_reference(verified_greedy, prompt_ids, gemma3_model):
    v = verified_greedy
    ref, ours, lc = v["ref"], v["ours"], v["lc"]
    kl_ours, kl_lc = kl_rows(ref, ours), kl_rows(ref, lc)
    print(f"\nGemma 3 Q4_K_M, {len(v['ids'])} positions: KL(ref || ours) mean {kl_ours.mean():.2e} "
          f"max {kl_ours.max():.2e} top-1 {top1(ref, ours):.4f} | KL(ref || llama.cpp) mean {kl_lc.mean():.2e} "
          f"max {kl_lc.max():.2e} top-1 {top1(ref, lc):.4f}")
    assert kl_ours.mean() <= 1e-6
    assert top1(ref, ours) == 1.0
    assert kl_ours.mean() * 10 < kl_lc.mean()
    ref_next = ref[len(prompt_ids) - 1:len(v["ids"]) - 1].argmax(-1)
    assert ref_next.tolist() == v["generated"]     # our KV-cached greedy path is the reference's
    if v["finish"] == "stop":
        assert int(ref[-1].argmax()) in gemma3_model.tokenizer.eog_ids


def test_gemma3_run_cli_prints_the_reference_greedy_text(verified_greedy, gemma3_path, gemma3_model):
    out = subprocess.run([sys.executable, "-m", "gguflm", "run", "-m", str(gemma3_path), "-p", QUESTION,
                          "--temp", "0", "-n", str(N_GEN), "-c", "256"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    expect = gemma3_model.tokenizer.decode(verified_greedy["generated"])
    assert out.stdout.rstrip("\n") == expect.rstrip("\n")


def test_gemma3_verify_passes(gemma3_path, tmp_path, llama_cpp):
    """`gguflm verify` on Gemma 3: the component checks follow its own block (q/k norms,
    post norms, GeGLU, local RoPE base and window), every check passes."""
    import contextlib
    import io
    import json

    from gguflm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["verify", "-m", str(gemma3_path), "-o", str(tmp_path), "-n", "4"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0, buf.getvalue()
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert not failed, failed
    names = {r["component"] for r in report["components"]["results"]}
    assert {"q_norm", "k_norm", "attn_post_norm", "ffn_post_norm", "geglu"} <= names
    assert "swiglu" not in names
    assert report["logits"]["ours_vs_reference"]["kl_mean"] < 1e-6
