"""Our tokenizer against llama.cpp's on every vocabulary of ../shared/vocab and on the
real SmolLM2 file: property tests over arbitrary text (hypothesis), every token's
piece and attributes, and the vocabulary-level facts (BOS/EOS, end-of-generation set).
Identity is required on 100% of cases."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ALL_VOCABS = ("llama-spm", "llama-bpe", "phi-3", "qwen2", "gpt-2", "falcon", "smollm2")
FLAGS = [(a, p) for a in (False, True) for p in (False, True)]
SETTINGS = settings(max_examples=150, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

WHITESPACE = st.sampled_from([" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\x0b", "\x0c",
                              "\x1c", "\x85", "\xa0", "\u2028", "\u3000", "\u200b", "    "])
DIGITS = st.from_regex(r"[0-9]{1,12}|[٠-٩]{1,4}|[½²Ⅻ①]", fullmatch=True)
EMOJI = st.one_of(st.sampled_from(["😀", "👍🏽", "🦙", "👨‍👩‍👧", "🏳️‍🌈", "✅", "❤️"]),
                  st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF))
WORDS = st.sampled_from(["Hello", "world", "the", "I", "ABC", "éèê", "naïve", "Straße", "İstanbul",
                         "привет", "Ελλάδα", "日本語", "中文", "한국어", "ไทย", "हिन्दी", "עברית",
                         "العربية", "a\u0301", "\u0301", "ǅ", "ﬁ", "ＡＢＣ"])
PUNCT = st.sampled_from(["'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'d", "'", "...", "!?", ",",
                         " .", " ,", " ' ", "\"", "(", ")", "$", "€", "->", "==", "//", "#", "@",
                         "<", ">", "</", "|", "_", "▁", "\ufffd", "\x00"])
CODE = st.sampled_from(["def f(x):\n    return x + 1\n", "if (a && b) { c(); }", "x = [1, 2, 3]",
                        "<div class=\"a\">", "SELECT * FROM t;", "    ", "\t\t"])


def texts(specials: list[str]):
    parts = [WHITESPACE, DIGITS, EMOJI, WORDS, PUNCT, CODE, st.text(max_size=6),
             st.characters(codec="utf-8")]
    if specials:
        parts.append(st.sampled_from(specials))
    return st.lists(st.one_of(*parts), max_size=14).map("".join)


def special_texts(llama) -> list[str]:
    """Texts of the control/user-defined tokens as llama.cpp reports them (fuzz input)."""
    out = [llama.text(i) for i in range(llama.n_vocab) if llama.attr(i) & (1 | 8 | 16)]
    return sorted(set(out))[:400]


@pytest.fixture(scope="module", params=ALL_VOCABS)
def vocab(request, pair):
    p = pair(request.param)
    if not hasattr(p, "specials"):
        p.specials = special_texts(p.llama)
    return p


def test_encode_matches(vocab):
    @SETTINGS
    @given(data=st.data())
    def check(data):
        text = data.draw(texts(vocab.specials))
        for add_special, parse_special in FLAGS:
            expect = vocab.llama.tokenize(text, add_special, parse_special)
            assert vocab.ours.encode(text, add_special, parse_special) == expect, \
                (text, add_special, parse_special)

    check()


def test_decode_matches(vocab):
    """Decode what llama.cpp produced, and arbitrary id sequences (split characters,
    byte tokens, control tokens anywhere), with every remove/unparse flag."""
    n = vocab.llama.n_vocab
    bos, eos = vocab.llama.special_id("bos"), vocab.llama.special_id("eos")
    extra = [t for t in (bos, eos) if t is not None]

    @SETTINGS
    @given(text=texts(vocab.specials),
           ids=st.lists(st.one_of(st.integers(0, n - 1), st.sampled_from(extra or [0]),
                                  st.integers(0, min(n, 300) - 1)), max_size=24))
    def check(text, ids):
        for seq in (vocab.llama.tokenize(text, True, True), ids):
            for remove_special, unparse_special in FLAGS:
                expect = vocab.llama.detokenize(seq, remove_special, unparse_special)
                got = vocab.ours.decode_bytes(seq, remove_special=remove_special,
                                              unparse_special=unparse_special)
                assert got == expect, (seq, remove_special, unparse_special)
        assert vocab.ours.decode(ids) == vocab.llama.detokenize(ids).decode("utf-8", "replace")

    check()


def test_every_token(vocab):
    """Piece (special on/off), text, control flag and end-of-generation flag of every id."""
    ours, llama = vocab.ours, vocab.llama
    assert ours.n_vocab == llama.n_vocab
    wrong = []
    for t in range(llama.n_vocab):
        if (ours.token_to_piece(t, special=True) != llama.piece(t, True)
                or ours.token_to_piece(t) != llama.piece(t, False)
                or ours.token_text(t) != llama.text(t)
                or ours.is_control(t) != llama.is_control(t)
                or (t in ours.eog_ids) != llama.is_eog(t)):
            wrong.append(t)
    assert not wrong, f"{len(wrong)} tokens differ, first {wrong[:5]}"


def test_vocabulary_facts(vocab):
    ours, llama = vocab.ours, vocab.llama
    assert (ours.bos_id, ours.eos_id) == (llama.special_id("bos"), llama.special_id("eos"))
    assert (ours.add_bos, ours.add_eos) == (llama.add_bos, llama.add_eos)
    assert ours.eog_ids == {t for t in range(llama.n_vocab) if llama.is_eog(t)}
    assert ours.model in ("llama", "gpt2")


@pytest.mark.parametrize("name", ALL_VOCABS)
def test_long_text(name, pair):
    """A long mixed document in one call (the chunking/caching paths), and empty input."""
    p = pair(name)
    text = ("The quick brown fox — 123,456.78 — jumps; 日本語のテキスト 😀\n\n"
            "def main():\n\tprint('hi')  # comment\n" + "x" * 300 + " " * 40 + "\n") * 20
    for add_special, parse_special in FLAGS:
        assert p.ours.encode(text, add_special, parse_special) == \
            p.llama.tokenize(text, add_special, parse_special)
        assert p.ours.encode("", add_special, parse_special) == p.llama.tokenize("", add_special, parse_special)
