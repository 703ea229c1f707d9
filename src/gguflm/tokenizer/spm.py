"""SentencePiece-style (SPM) encoding as llama.cpp's ``llm_tokenizer_spm_session``.

The text (spaces already escaped to U+2581 "▁") starts as one symbol per code point.
Every adjacent pair whose concatenation is a token is a candidate; repeatedly the
candidate with the highest token score (ties: leftmost) is merged, and the pairs it
forms with its neighbours become candidates (:func:`~gguflm.tokenizer.merge.merge`).
A final symbol that is a token is emitted as that token, otherwise as its UTF-8 bytes
through the byte tokens ``<0xXX>`` (byte fallback).

Speed: a merge can only join two code points that occur side by side inside some
token. Where ``c▁`` occurs in no token, nothing ever spans the boundary before that
``▁``, and the merging on either side is independent; so the text is cut there into
word-like chunks, each encoded once and cached.
"""

from __future__ import annotations

import re

from gguflm.errors import GGUFError
from gguflm.tokenizer.merge import merge
from gguflm.tokenizer.vocab import Vocab

SPACE = "\u2581"
CACHE_LIMIT = 1 << 17


class SPMEncoder:
    """Encodes ▁-escaped text with a vocabulary of scored pieces."""

    def __init__(self, vocab: Vocab):
        self.ids = vocab.token_to_id
        self._priority = {text: -score for text, score in zip(vocab.texts, vocab.scores)}
        glue = {t[i] for t in vocab.texts for i in range(len(t) - 1) if t[i + 1] == SPACE}
        lookbehind = f"(?<![{re.escape(''.join(sorted(glue)))}])" if glue else ""
        self._cut = re.compile(f"{lookbehind}(?={SPACE})")
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (already escaped; no BOS/EOS)."""
        out: list[int] = []
        cache = self._cache
        for chunk in self._cut.split(text):
            ids = cache.get(chunk)
            if ids is None:
                if len(cache) >= CACHE_LIMIT:
                    cache.clear()
                ids = cache[chunk] = self._encode_chunk(chunk)
            out.extend(ids)
        return out

    def byte_token(self, b: int) -> int:
        """llama.cpp's byte_to_token: ``<0xXX>``, else the byte itself as a 1-byte token."""
        tid = self.ids.get(f"<0x{b:02X}>")
        if tid is None and b < 0x80:
            tid = self.ids.get(chr(b))
        if tid is None:
            raise GGUFError(f"the vocabulary has no token for byte 0x{b:02X} (byte fallback)")
        return tid

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        ids = self.ids
        out: list[int] = []
        for sym in merge(list(chunk), self._priority, ""):
            tid = ids.get(sym)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self.byte_token(b) for b in sym.encode("utf-8"))
        return tuple(out)

