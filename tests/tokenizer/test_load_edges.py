"""Tokenizer edges (issue 16 item 6): text without a UTF-8 encoding is a documented
TextError at encode; vocabularies that encode/decode could not serve are refused at LOAD
(``Tokenizer.from_gguf``) with GGUFError, not later."""

from __future__ import annotations

import struct

import pytest

import gguflm
from gguflm.gguf.reader import ValueType

I32_ARRAY, STR_ARRAY = (ValueType.ARRAY, ValueType.INT32), (ValueType.ARRAY, ValueType.STRING)


@pytest.fixture(scope="module")
def base(vocab_path):
    """base(name) -> (metadata, types) of a shared vocabulary, copied per call."""

    def get(name):
        with gguflm.GGUFFile(vocab_path(name)) as f:
            meta = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f.metadata.items()}
            return meta, dict(f.metadata_types)

    return get


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2"])
@pytest.mark.parametrize("text", ["a\ud800b", "\udcff\udcfe", "ok \udfff"])
def test_lone_surrogate_is_a_text_error(name, text, vocab_path):
    tok = gguflm.Tokenizer.from_gguf(vocab_path(name))
    with pytest.raises(gguflm.TextError, match="lone surrogate") as e:
        tok.encode(text)
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnicodeEncodeError):  # the reason: no UTF-8 for llama.cpp to tokenize
        text.encode("utf-8")
    assert tok.encode("a\U0001F600b")  # a proper pair of code points is fine


def test_byte_token_with_malformed_text_refused_at_load(tmp_path, base, gguf_writer, llama_loader):
    """A BYTE token whose text is too short for llama.cpp's substr(3, 2): llama.cpp refuses
    the file at load (its piece cache throws); so do we."""
    meta, types = base("gpt-2")
    token_type = [1] * len(meta["tokenizer.ggml.tokens"])
    token_type[0] = 6  # "!" typed BYTE
    meta["tokenizer.ggml.token_type"], types["tokenizer.ggml.token_type"] = token_type, I32_ARRAY
    path = gguf_writer(tmp_path / "short-byte.gguf", meta, types)
    with pytest.raises(RuntimeError, match="could not load"):
        llama_loader(path)
    with pytest.raises(gguflm.GGUFError, match=r"token 0 '!' has type BYTE"):
        gguflm.Tokenizer.from_gguf(path)


def test_byte_token_with_garbage_hex_refused_at_load(tmp_path, base, gguf_writer):
    """``<0xZZ>`` typed BYTE: llama.cpp's strtol makes it byte 0; gguflm refuses it."""
    meta, types = base("llama-spm")
    tokens = list(meta["tokenizer.ggml.tokens"])
    i = tokens.index("<0x41>")
    assert meta["tokenizer.ggml.token_type"][i] == 6
    tokens[i] = "<0xZZ>"
    meta["tokenizer.ggml.tokens"] = tokens
    path = gguf_writer(tmp_path / "zz-byte.gguf", meta, types)
    with pytest.raises(gguflm.GGUFError, match=r"'<0xZZ>' has type BYTE"):
        gguflm.Tokenizer.from_gguf(path)


def test_spm_without_byte_tokens_refused_at_load(tmp_path, base, gguf_writer):
    """SPM byte fallback needs <0xHH> tokens; without them llama.cpp loads the file and
    throws out_of_range at the first unspellable byte while tokenizing."""
    meta, types = base("llama-spm")
    tokens = [f"[B{t[3:5]}]" if t.startswith("<0x") else t for t in meta["tokenizer.ggml.tokens"]]
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = [1 if t == 6 else t for t in meta["tokenizer.ggml.token_type"]]
    path = gguf_writer(tmp_path / "no-bytes.gguf", meta, types)
    with pytest.raises(gguflm.GGUFError, match=r"SPM vocabulary without a token for byte 0x00"):
        gguflm.Tokenizer.from_gguf(path)


def test_empty_vocabulary_refused_at_load(tmp_path):
    """0 tokens (written by hand: GGUFWriter refuses empty arrays)."""

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    kvs = [s("general.architecture") + struct.pack("<I", ValueType.STRING) + s("llama"),
           s("tokenizer.ggml.model") + struct.pack("<I", ValueType.STRING) + s("llama"),
           s("tokenizer.ggml.tokens") + struct.pack("<IIQ", ValueType.ARRAY, ValueType.STRING, 0)]
    path = tmp_path / "empty-vocab.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    gguflm.GGUFFile(path)  # a valid GGUF file
    with pytest.raises(gguflm.GGUFError, match="tokenizer.ggml.tokens is empty"):
        gguflm.Tokenizer.from_gguf(path)
