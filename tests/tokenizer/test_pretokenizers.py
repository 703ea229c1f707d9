"""Every pre-tokenizer of llama.cpp's table against llama.cpp itself. The shared files
cover only a few ``tokenizer.ggml.pre`` values, so the GPT-2 vocabulary is rewritten
once per distinct setting (same tokens and merges, another ``pre``): the split points
are then visible in the ids, and llama.cpp loads the same file."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguflm.gguf.reader import ValueType
from gguflm.tokenizer.pretokenize import PRE_SETTINGS

# One tokenizer.ggml.pre name per distinct setting (pre-tokenizer + flags).
REPRESENTATIVES = sorted({s: name for name, s in reversed(PRE_SETTINGS.items())}.values())

PIECES = st.sampled_from([
    " ", "  ", "\t", "\n", "\r\n", "\n\n ", "\u3000", "\xa0", "\x0b", "\x1c", "'s", "'S", "'LL", "'re",
    "Hello", "wORLD", "CamelCase", "éÉ", "ǅ", "日本語", "ひらがな", "カタカナ", "한국어", "ㄱㄴ", "ㄅ", "ไทย",
    "a\u0301", "\u0301", "1", "12", "1234567", "3.14", "٣", "½", "Ⅻ", "😀", "👍🏽", "...", "!?", "，。",
    "$", "€", "+=", "->", "//", "<sentinel:12>", "IMGIMGABZ", "    ", "€1,000", "x/y", "\u2028",
])
TEXT = st.lists(st.one_of(PIECES, st.text(max_size=5)), max_size=12).map("".join)


@pytest.mark.parametrize("pre", REPRESENTATIVES)
def test_pre_tokenizer(pre, variant):
    p = variant("gpt-2", tokenizer__ggml__pre=(pre, (ValueType.STRING,)))

    @settings(max_examples=30, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(text=TEXT)
    def check(text):
        for add_special in (False, True):
            assert p.ours.encode(text, add_special, True) == p.llama.tokenize(text, add_special, True), text
        ids = p.llama.tokenize(text, False, False)
        assert p.ours.decode_bytes(ids) == p.llama.detokenize(ids)

    check()
    assert p.ours.pre == pre

