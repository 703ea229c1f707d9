"""Fixtures for the verify/perplexity tests: a small TinyLlama-shaped model with random
weights (written by the official ``gguf`` package, quantized by its reference quantizers
into several legacy types) and the public-domain text the perplexity tests score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent.parent / "data"

# TinyLlama-1.1B's template (zephyr style), as its tokenizer_config.json ships it.
TINYLLAMA_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def write_tinyllama_like(path: Path, vocab_file: Path, seed: int = 0) -> Path:
    """TinyLlama's shape scaled down: 3 layers, width 256, 8 query heads sharing 1 KV head
    (GQA 8 as TinyLlama), FFN 704 (2.75x), untied output, its SPM vocabulary (32000 tokens,
    copied from llama.cpp's ggml-vocab-llama-spm.gguf) and chat template; weights in
    Q8_0/Q4_0/Q5_0/Q5_1/Q4_1/F16/F32 quantized by gguf-py."""
    gguf = pytest.importorskip("gguf")
    from gguflm import GGUFFile

    Q = gguf.GGMLQuantizationType
    vocab = GGUFFile(vocab_file)
    md = vocab.metadata
    E, H, HKV, F, L = 256, 8, 1, 704, 3
    D = E // H
    V = len(md["tokenizer.ggml.tokens"])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tinyllama-shaped synthetic")
    w.add_block_count(L)
    w.add_context_length(2048)
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(md["tokenizer.ggml.model"])
    w.add_tokenizer_pre(md.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(md["tokenizer.ggml.tokens"])
    w.add_token_scores(md["tokenizer.ggml.scores"])
    w.add_token_types(md["tokenizer.ggml.token_type"])
    w.add_bos_token_id(md["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
    w.add_unk_token_id(md["tokenizer.ggml.unknown_token_id"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(TINYLLAMA_TEMPLATE)

    rng = np.random.default_rng(seed)

    def add(name: str, rows: int, cols: int, qtype, std: float) -> None:
        x = (rng.standard_normal((rows, cols)) * std).astype(np.float32)      # [out, in]
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    add("token_embd.weight", V, E, Q.Q8_0, 1.0)
    for b in range(L):
        norm(f"blk.{b}.attn_norm.weight", E)
        add(f"blk.{b}.attn_q.weight", H * D, E, Q.Q4_0, 0.15)
        add(f"blk.{b}.attn_k.weight", HKV * D, E, Q.Q4_0, 0.15)
        add(f"blk.{b}.attn_v.weight", HKV * D, E, Q.Q5_0, 0.08)
        add(f"blk.{b}.attn_output.weight", E, H * D, Q.Q5_1, 0.08)
        norm(f"blk.{b}.ffn_norm.weight", E)
        add(f"blk.{b}.ffn_gate.weight", F, E, Q.Q4_1, 0.08)
        add(f"blk.{b}.ffn_up.weight", F, E, Q.Q4_1, 0.08)
        add(f"blk.{b}.ffn_down.weight", E, F, Q.Q8_0, 0.05)
    norm("output_norm.weight", E)
    add("output.weight", V, E, Q.F16, 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tinyllama_like(tmp_path_factory, shared_dir) -> Path:
    """Path of the synthetic TinyLlama-shaped model (see :func:`write_tinyllama_like`)."""
    vocab = shared_dir / "vocab" / "ggml-vocab-llama-spm.gguf"
    if not vocab.exists():
        pytest.skip(f"shared test data not found: {vocab}")
    return write_tinyllama_like(tmp_path_factory.mktemp("synthetic") / "tinyllama-like.gguf", vocab)


@pytest.fixture(scope="session")
def english_text() -> Path:
    """Chapter 1 of Pride and Prejudice (Jane Austen, 1813; public domain), ~1100 tokens."""
    return DATA / "pride_and_prejudice_ch1.txt"
