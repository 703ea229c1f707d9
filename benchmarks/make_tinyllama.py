"""Write a Llama-architecture GGUF with seeded random weights in the shape of
TinyLlama-1.1B-Chat (22 layers, width 2048, FFN 5632, 32 heads / 4 KV heads, head size
64, vocab 32000, RoPE base 10000), the model the CUDA benchmark runs; smaller shapes for
tests. The tokenizer fields (SPM, 32000 tokens) are copied from llama.cpp's
``ggml-vocab-llama-spm.gguf``. Weights are N(0, 0.02) (norms 1), stored as F16 or F32;
llama.cpp's ``llama-quantize`` turns the file into Q4_K_M, Q4_0, ...

    python benchmarks/make_tinyllama.py OUT.gguf --vocab ../shared/vocab/ggml-vocab-llama-spm.gguf
    python benchmarks/make_tinyllama.py OUT.gguf --vocab ... --layers 2 --width 128 --ffn 352 \\
        --heads 4 --kv-heads 2 --vocab-size 512 --dtype f32   # a tiny one for tests

Needs the ``gguf`` package (gguf-py) and numpy.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def copy_tokenizer(writer, vocab_path: str, limit: int | None = None) -> int:
    """Copy every ``tokenizer.*`` key of the vocab file, the per-token arrays cut to the
    first ``limit`` tokens when given; returns the token count written."""
    import gguf

    reader = gguf.GGUFReader(vocab_path)
    n_vocab = 0
    for name, fld in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = fld.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = fld.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(fld.parts[i]) for i in fld.data]
            else:
                value = [fld.parts[i].tolist()[0] for i in fld.data]
            if limit is not None and name in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                              "tokenizer.ggml.token_type"):
                value = value[:limit]
            writer.add_array(name, value)
            if name == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(name, bytes(fld.parts[fld.data[0]]).decode("utf-8"))
        else:
            writer.add_key_value(name, fld.parts[fld.data[0]].tolist()[0], vtype)
    return n_vocab


def _add(writer, name: str, t) -> None:
    """A plain array, or ``{"tensor": quantized bytes, "raw_dtype": type}``."""
    if isinstance(t, dict):
        writer.add_tensor(name, t["tensor"], raw_dtype=t["raw_dtype"])
    else:
        writer.add_tensor(name, t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--vocab", required=True, help="GGUF file to take the tokenizer from")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--dtype", choices=("f16", "f32", "q4_0", "q8_0"), default="f16",
                   help="q4_0/q8_0: matrices quantized by gguf-py's numpy quantizer (where llama-quantize is absent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="keep only the first N tokens of the vocabulary (small test models)")
    a = p.parse_args(argv)

    import gguf

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("tinyllama-1.1b-random")
    n_vocab = copy_tokenizer(w, a.vocab, a.vocab_size)
    head_dim = a.width // a.heads
    w.add_context_length(a.ctx)
    w.add_embedding_length(a.width)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.ffn)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    ftypes = {"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w.add_file_type(ftypes[a.dtype])

    rng = np.random.default_rng(a.seed)
    dt = np.float16 if a.dtype == "f16" else np.float32
    qtype = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}.get(a.dtype)

    def rand(*shape: int):  # numpy shape: rows first (ggml ne reversed)
        x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dt)
        if qtype is None:
            return x
        return {"tensor": gguf.quants.quantize(x, qtype), "raw_dtype": qtype}

    E, F, kv = a.width, a.ffn, a.kv_heads * head_dim
    _add(w, "token_embd.weight", rand(n_vocab, E))
    w.add_tensor("output_norm.weight", np.ones(E, dtype=np.float32))
    _add(w, "output.weight", rand(n_vocab, E))
    for i in range(a.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(E, dtype=np.float32))
        _add(w, f"blk.{i}.attn_q.weight", rand(E, E))
        _add(w, f"blk.{i}.attn_k.weight", rand(kv, E))
        _add(w, f"blk.{i}.attn_v.weight", rand(kv, E))
        _add(w, f"blk.{i}.attn_output.weight", rand(E, E))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(E, dtype=np.float32))
        _add(w, f"blk.{i}.ffn_gate.weight", rand(F, E))
        _add(w, f"blk.{i}.ffn_up.weight", rand(F, E))
        _add(w, f"blk.{i}.ffn_down.weight", rand(E, F))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out}: {a.layers} layers, width {E}, vocab {n_vocab}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
