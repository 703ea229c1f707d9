"""Metadata flags and defaults that the shared vocabularies do not exercise: copies of
them with keys changed or removed, each compared with llama.cpp on the same file."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguflm.gguf.reader import ValueType

STR, U32, BOOL = (ValueType.STRING,), (ValueType.UINT32,), (ValueType.BOOL,)

VARIANTS = {
    "spm-no-space-prefix": ("llama-spm", dict(tokenizer__ggml__add_space_prefix=(False, BOOL))),
    "spm-eos-not-bos": ("llama-spm", dict(tokenizer__ggml__add_bos_token=(False, BOOL),
                                          tokenizer__ggml__add_eos_token=(True, BOOL))),
    "spm-no-token-types": ("llama-spm", dict(tokenizer__ggml__token_type=(None, None))),
    "spm-no-ids-no-flags": ("llama-spm", dict(tokenizer__ggml__bos_token_id=(None, None),
                                              tokenizer__ggml__eos_token_id=(None, None),
                                              tokenizer__ggml__add_bos_token=(None, None),
                                              tokenizer__ggml__add_eos_token=(None, None))),
    "phi3-renamed": ("phi-3", dict(general__name=("other", STR))),
    "bpe-space-prefix": ("gpt-2", dict(tokenizer__ggml__add_space_prefix=(True, BOOL))),
    "bpe-bos-out-of-range": ("gpt-2", dict(tokenizer__ggml__bos_token_id=(10**6, U32),
                                           tokenizer__ggml__add_bos_token=(True, BOOL))),
    "bpe-gemma4-model": ("gpt-2", dict(tokenizer__ggml__model=("gemma4", STR))),
    "qwen2-eot-given": ("qwen2", dict(tokenizer__ggml__eot_token_id=(151643, U32))),
    "smollm2-add-bos": ("smollm2", dict(tokenizer__ggml__add_bos_token=(True, BOOL),
                                        tokenizer__ggml__add_eos_token=(True, BOOL))),
    "llama3-no-pre-flags": ("llama-bpe", dict(tokenizer__ggml__pre=("dbrx", STR))),
}

TEXT = st.lists(st.one_of(
    st.sampled_from([" ", "  ", "\n", "Hello", " world", "'s", " .", " ,", " ' ", "é", "日本", "12345",
                     "😀", "<s>", "</s>", "<|endoftext|>", "<|end|>", "<|im_end|>", "<0x0A>", "▁"]),
    st.text(max_size=4)), max_size=10).map("".join)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant(name, variant):
    base, changes = VARIANTS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # out-of-range ids warn, as llama.cpp does
        p = variant(base, **changes)
    n = p.llama.n_vocab

    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(text=TEXT, ids=st.lists(st.integers(0, n - 1), max_size=12))
    def check(text, ids):
        for add_special in (False, True):
            for parse_special in (False, True):
                assert p.ours.encode(text, add_special, parse_special) == \
                    p.llama.tokenize(text, add_special, parse_special), text
        for seq in (p.llama.tokenize(text, True, True), ids):
            for remove_special in (False, True):
                assert p.ours.decode_bytes(seq, remove_special=remove_special) == \
                    p.llama.detokenize(seq, remove_special, False), seq

    check()
    assert (p.ours.bos_id, p.ours.eos_id) == (p.llama.special_id("bos"), p.llama.special_id("eos"))
    assert (p.ours.add_bos, p.ours.add_eos) == (p.llama.add_bos, p.llama.add_eos)
    assert p.ours.eog_ids == {t for t in range(n) if p.llama.is_eog(t)}
    assert [t for t in range(n) if p.ours.is_control(t)] == [t for t in range(n) if p.llama.is_control(t)]


def test_missing_pre_warns_and_uses_default(variant):
    """No tokenizer.ggml.pre: llama.cpp warns and uses its 'default' pre-tokenizer."""
    with pytest.warns(UserWarning, match="tokenizer.ggml.pre"):
        p = variant("gpt-2", tokenizer__ggml__pre=(None, None))
    text = "Hello, world!!! 1234567 don't $x+=1 ..."
    assert p.ours.pre == ""
    assert p.ours.encode(text, False) == p.llama.tokenize(text, False, False)
