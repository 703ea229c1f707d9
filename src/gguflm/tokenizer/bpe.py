"""Byte-pair encoding as llama.cpp's ``llm_tokenizer_bpe_session``.

Each pre-token (word) is mapped to GPT-2's byte alphabet (unless the pre-tokenizer
works on raw UTF-8), split into code points, and merged: repeatedly the adjacent pair
with the lowest merge rank (ties: leftmost) becomes one symbol. A final symbol that
is a token is emitted as such; otherwise each of its UTF-8 bytes that is a token on
its own is emitted (``<0xXX>`` tokens for raw-UTF-8 vocabularies), the rest dropped.
With ``ignore_merges`` a word that is already a token is emitted whole.
"""

from __future__ import annotations

from itertools import chain

from gguflm.tokenizer.merge import merge
from gguflm.tokenizer.pretokenize import PreTokenizer
from gguflm.tokenizer.unicode import BYTE_ENCODE
from gguflm.tokenizer.vocab import Vocab

CACHE_LIMIT = 1 << 17


class BPEEncoder:
    """Encodes text with a merge table and llama.cpp's pre-tokenizer for the vocabulary."""

    def __init__(self, vocab: Vocab):
        assert vocab.setting is not None
        self.setting = vocab.setting
        self.pre = PreTokenizer(vocab.setting.pre_type)
        self.ids = vocab.token_to_id
        self.ranks = vocab.ranks                 # "left right" -> rank
        self.ignore_merges = vocab.ignore_merges
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of one text fragment (no special-token handling, no BOS/EOS)."""
        words = self.pre.split(text)
        cache = self._cache
        found = list(map(cache.get, words))    # (n_words,) cached ids or None
        if None in found:
            for i, ids in enumerate(found):
                if ids is None:
                    ids = cache.get(words[i])
                    if ids is None:
                        if len(cache) >= CACHE_LIMIT:
                            cache.clear()
                        ids = cache[words[i]] = self._encode_word(words[i])
                    found[i] = ids
        return list(chain.from_iterable(found))

    def _encode_word(self, word: str) -> tuple[int, ...]:
        setting, ids = self.setting, self.ids
        if setting.byte_encode:
            word = word.encode("utf-8").decode("latin-1").translate(BYTE_ENCODE)
        whole = ids.get(word)
        if whole is not None and (self.ignore_merges or
                                  (setting.whole_newline_words and not word.strip("\n"))):
            return (whole,)
        out: list[int] = []
        for sym in merge(list(word), self.ranks, " "):
            tid = ids.get(sym)
            if tid is not None:
                out.append(tid)
                continue
            for b in sym.encode("utf-8"):
                if setting.byte_encode:
                    tid = ids.get(chr(b)) if b < 0x80 else None
                else:
                    tid = ids.get(f"<0x{b:02X}>")
                if tid is not None:
                    out.append(tid)
        return tuple(out)
