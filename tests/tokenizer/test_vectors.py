"""llama.cpp's own tokenizer test vectors (tests/test-tokenizer-0 there): every string
of ../shared/vocab/*.inp must tokenize to the ids of the matching .out line, with the
flags test-tokenizer-0 uses (add_special=False, parse_special=False)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguflm import Tokenizer

VOCABS = ("llama-spm", "llama-bpe", "phi-3", "qwen2", "gpt-2", "falcon")
SEPARATOR = "\n__ggml_vocab_test__\n"


def read_vectors(vocab: Path) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs, split the way test-tokenizer-0 splits them (bytes, no newline
    translation; no empty case after a final separator)."""
    raw = Path(f"{vocab}.inp").read_bytes().decode("utf-8")
    texts, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEPARATOR, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(SEPARATOR)
    lines = Path(f"{vocab}.out").read_bytes().decode("utf-8").split("\n")
    lines = lines[:-1] if lines and lines[-1] == "" else lines
    assert len(texts) == len(lines), "input and output files disagree on the number of tests"
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vectors(name, vocab_path, pair):
    path = vocab_path(name)
    vectors = read_vectors(path)
    assert len(vectors) > 30
    tok: Tokenizer = pair(name).ours  # loaded once per session, shared with the oracle tests
    wrong = [(text, expect, got) for text, expect in vectors
             if (got := tok.encode(text, add_special=False, parse_special=False)) != expect]
    assert not wrong, f"{len(wrong)}/{len(vectors)} vectors differ, first: {wrong[0]!r}"
