"""llama.cpp classifies characters with its own Unicode tables (general categories of
Unicode 15.1), not with Python's or the regex module's. Checked two ways: our table
against the Unicode Character Database 15.1 (unicodedata2), and every class boundary
of the table through llama.cpp's own pre-tokenizers."""

from __future__ import annotations

import unicodedata

import pytest

import gguflm
from gguflm.gguf.reader import ValueType
from gguflm.tokenizer import unicode as uni
from gguflm.tokenizer.pretokenize import PRE_SETTINGS, PreTokenizer
from gguflm.tokenizer.vocab import load_vocab
from gguflm.tokenizer.gen_unicode_data import UNICODE_VERSION, ranges
from gguflm.tokenizer.unicode_data import RANGES


def test_table_is_the_unicode_database():
    ucd = pytest.importorskip("unicodedata2", reason="pip install unicodedata2==15.1.0")
    if ucd.unidata_version != UNICODE_VERSION:
        pytest.skip(f"unicodedata2 {ucd.unidata_version} installed, the table is {UNICODE_VERSION}")
    assert tuple(ranges(ucd.category)) == RANGES


def _probe_points() -> list[int]:
    """Both ends of every class run, and the code points Python's own database classifies
    differently (another Unicode version), minus surrogates."""
    bounds = [first for first, _ in RANGES[1:]] + [uni.MAX_CODEPOINT]
    points = {cp for (first, _), end in zip(RANGES, bounds) for cp in (first, end - 1)}
    cls = uni.classes()
    points |= {cp for cp in range(0x30000) if unicodedata.category(chr(cp))[0] != cls[cp]
               and not (cls[cp] == "U" and unicodedata.category(chr(cp)) == "Cn")}
    return sorted(cp for cp in points if not 0xD800 <= cp <= 0xDFFF)


def revealing_vocab(words: list[str], base: dict, types: dict) -> tuple[dict, dict]:
    """A byte-level BPE vocabulary in which every given word merges, left to right, into
    one token: a word split anywhere else then yields other ids, so the ids show the
    pre-tokenizer's split points (whatever the characters)."""
    tokens = list(uni.BYTE_TO_CHAR)
    known, merges = set(tokens), []
    for word in dict.fromkeys(words):
        enc = word.encode().decode("latin-1").translate(uni.BYTE_ENCODE)
        for k in range(2, len(enc) + 1):
            if enc[:k] not in known:
                known.add(enc[:k])
                tokens.append(enc[:k])
            merges.append(f"{enc[:k - 1]} {enc[k - 1]}")
    meta = {k: v for k, v in base.items() if not k.startswith("tokenizer.")}
    meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                 "tokenizer.ggml.merges": merges})
    types = {**types, "tokenizer.ggml.tokens": (ValueType.ARRAY, ValueType.STRING),
             "tokenizer.ggml.merges": (ValueType.ARRAY, ValueType.STRING)}
    return meta, types


# Pre-tokenizers that tell the classes apart: letters/numbers/space/other (gpt-2),
# punctuation vs symbols (default), marks (qwen35), letters/punctuation/numbers in
# separate regexes (deepseek-coder), Han blocks (kimi-k2).
@pytest.mark.parametrize("pre", ["gpt-2", "default", "qwen35", "deepseek-coder", "kimi-k2"])
def test_class_boundaries_through_llama_cpp(pre, vocab_path, gguf_writer, llama_loader, tmp_path):
    text = "".join(f"a{c}0{c}!{c}${c} {c}{c}\n" for c in map(chr, _probe_points()))
    pretok = PreTokenizer(PRE_SETTINGS[pre].pre_type)
    with gguflm.GGUFFile(vocab_path("gpt-2")) as f:
        meta, types = revealing_vocab(pretok.split(text), f.metadata, f.metadata_types)
    meta["tokenizer.ggml.pre"] = pre
    path = gguf_writer(tmp_path / "probe.gguf", meta, types)
    ours = gguflm.Tokenizer(load_vocab(meta, types))
    assert ours.encode(text, False) == llama_loader(path).tokenize(text, False, False)
