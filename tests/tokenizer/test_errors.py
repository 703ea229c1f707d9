"""Malformed tokenizer metadata: gguflm raises GGUFError naming the problem, where
llama.cpp refuses to load the same file."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gguflm
from gguflm.gguf.reader import ValueType

STR, U32, I32 = (ValueType.STRING,), (ValueType.UINT32,), (ValueType.INT32,)
F32_ARRAY, I32_ARRAY = (ValueType.ARRAY, ValueType.FLOAT32), (ValueType.ARRAY, ValueType.INT32)


def _tokens(meta):
    return meta["tokenizer.ggml.tokens"]


CASES = {
    # name: (base, key, value or callable(meta), type, message fragment)
    "missing model": ("llama-spm", "tokenizer.ggml.model", None, None, "tokenizer.ggml.model"),
    "unknown model": ("llama-spm", "tokenizer.ggml.model", "no-such-model", STR, "no-such-model"),
    "unknown pre": ("gpt-2", "tokenizer.ggml.pre", "no-such-pre", STR, "no-such-pre"),
    "missing tokens": ("llama-spm", "tokenizer.ggml.tokens", None, None, "tokenizer.ggml.tokens"),
    "tokens not strings": ("llama-spm", "tokenizer.ggml.tokens", lambda m: list(range(len(_tokens(m)))),
                           I32_ARRAY, "tokenizer.ggml.tokens"),
    "scores too short": ("llama-spm", "tokenizer.ggml.scores", lambda m: [0.0] * (len(_tokens(m)) - 1),
                         F32_ARRAY, "tokenizer.ggml.scores"),
    "token types as floats": ("llama-spm", "tokenizer.ggml.token_type",
                              lambda m: [1.0] * len(_tokens(m)), F32_ARRAY, "tokenizer.ggml.token_type"),
    "token types too short": ("llama-spm", "tokenizer.ggml.token_type", [1, 1, 1], I32_ARRAY,
                              "tokenizer.ggml.token_type"),
    "bos id as int32": ("llama-spm", "tokenizer.ggml.bos_token_id", 1, I32, "bos_token_id"),
    "add_bos as uint32": ("llama-spm", "tokenizer.ggml.add_bos_token", 1, U32, "add_bos_token"),
    "missing merges": ("gpt-2", "tokenizer.ggml.merges", None, None, "tokenizer.ggml.merges"),
}


@pytest.fixture(scope="module")
def bases(vocab_path):
    """bases(name) -> (metadata, types) of a shared vocabulary, copied per test."""
    cache = {}

    def get(name):
        if name not in cache:
            with gguflm.GGUFFile(vocab_path(name)) as f:
                cache[name] = dict(f.metadata), dict(f.metadata_types)
        return cache[name]

    return get


@pytest.fixture
def write(tmp_path, bases, gguf_writer):
    """write(base, key, value, type) -> a copy of a vocabulary with one key changed."""

    def make(base, key, value, vtype):
        meta, types = (dict(d) for d in bases(base))
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value(meta) if callable(value) else value
            types[key] = vtype
        return gguf_writer(tmp_path / "bad.gguf", meta, types)

    return make


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_like_llama_cpp(case, write, llama_loader):
    base, key, value, vtype, fragment = CASES[case]
    path = write(base, key, value, vtype)
    with pytest.raises(RuntimeError, match="could not load"):
        llama_loader(path)
    with pytest.raises(gguflm.GGUFError, match=fragment.replace(".", r"\.")):
        gguflm.Tokenizer.from_gguf(path)


def test_duplicate_token_text(write):
    """llama.cpp aborts on a vocabulary with two tokens of the same text (an assertion,
    so it is observed in a child process); gguflm raises GGUFError."""
    path = write("llama-spm", "tokenizer.ggml.tokens",
                  lambda m: [*_tokens(m)[:-1], _tokens(m)[100]], (ValueType.ARRAY, ValueType.STRING))
    child = ("import ctypes, llama_cpp as ll, sys\n"
             "ll.llama_log_set(ll.llama_log_callback(lambda *a: None), ctypes.c_void_p())\n"
             "p = ll.llama_model_default_params(); p.vocab_only = True\n"
             "m = ll.llama_model_load_from_file(sys.argv[1].encode(), p)\n"
             "sys.exit(0 if m else 3)\n")
    pytest.importorskip("llama_cpp")
    run = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, timeout=120)
    assert run.returncode != 0
    with pytest.raises(gguflm.GGUFError, match="duplicates token 100"):
        gguflm.Tokenizer.from_gguf(path)


def test_unsupported_tokenizer_model(write):
    """Tokenizer models other than SPM and BPE (WordPiece, Unigram, RWKV...) are refused
    with a message naming them."""
    path = write("llama-spm", "tokenizer.ggml.model", "bert", STR)
    with pytest.raises(gguflm.GGUFError, match="'bert' is not supported"):
        gguflm.Tokenizer.from_gguf(path)
