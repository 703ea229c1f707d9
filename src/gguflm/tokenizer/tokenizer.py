"""The tokenizer: llama.cpp's ``llama_tokenize`` / ``llama_detokenize`` in Python.

``encode`` = ``llama_tokenize(text, add_special, parse_special)``:

1. special-token partition: the text is cut at every occurrence of each special token
   (control, user-defined and unknown tokens, longest first); control and unknown
   tokens only when ``parse_special``, user-defined ones always; a token marked
   lstrip/rstrip eats the ASCII spaces before/after it;
2. each remaining text piece is encoded on its own: SPM (``llama``) escapes spaces to
   "▁" and, when ``add_space_prefix``, prefixes a space to a piece that starts the text
   or follows a special token; BPE (``gpt2``) pre-tokenizes and merges;
3. ``add_special`` adds BOS/EOS where the vocabulary asks for them.

Text without a UTF-8 encoding (a lone surrogate, e.g. ``"a\\ud800b"``) cannot reach
llama.cpp, which tokenizes UTF-8 bytes: ``encode`` raises :class:`gguflm.TextError` (a
ValueError) for it. A vocabulary that encode or decode could not serve (no tokens, a
malformed BYTE token, SPM without byte fallback) is refused at load with GGUFError.

``decode_bytes`` = ``llama_detokenize(ids, remove_special, unparse_special)``: the pieces
of the tokens (control and unknown tokens are empty unless ``unparse_special``), the
first one losing one leading space when ``add_space_prefix``, then, for vocabularies
with ``clean_spaces``, llama.cpp's clean-up of spaces before punctuation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from gguflm.errors import TextError
from gguflm.gguf.reader import GGUFFile
from gguflm.tokenizer.bpe import BPEEncoder
from gguflm.tokenizer.spm import SPACE, SPMEncoder
from gguflm.tokenizer.unicode import CHAR_TO_BYTE
from gguflm.tokenizer.vocab import Attr, Vocab, load_vocab

_SURROGATE = re.compile("[\ud800-\udfff]")
C_SPACES = " \t\n\v\f\r"  # isspace() in the "C" locale: what lstrip/rstrip remove
HIDDEN = Attr.CONTROL | Attr.UNKNOWN  # empty pieces unless special tokens are rendered
# llama.cpp's three clean-up passes, in order (see llama_vocab::impl::detokenize).
_CLEAN = (re.compile(rb" (?=[?!.,])"), re.compile(rb" ' "), re.compile(rb" (?='[sm]|'re|'ve)"))
_CLEAN_REPL = (b"", b"'", b"")
_CLEAN_HINTS = (b" ?", b" !", b" .", b" ,", b" '")


class Tokenizer:
    """Token ids <-> text exactly as llama.cpp, built only from a GGUF file's metadata."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._encoder: SPMEncoder | BPEEncoder = (
            SPMEncoder(vocab) if vocab.kind == "spm" else BPEEncoder(vocab))
        self._pieces: list[bytes | None] = [None] * vocab.n_tokens

    @classmethod
    def from_gguf(cls, source: str | os.PathLike | GGUFFile) -> Tokenizer:
        """The tokenizer of a GGUF file (a model or a vocabulary-only file)."""
        if isinstance(source, GGUFFile):
            return cls(load_vocab(source.metadata, source.metadata_types))
        with GGUFFile(source) as f:
            return cls(load_vocab(f.metadata, f.metadata_types))

    # -- properties -------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.vocab.n_tokens

    @property
    def model(self) -> str:
        """tokenizer.ggml.model: "llama" (SPM) or "gpt2" (BPE); "gemma4" is BPE too."""
        return self.vocab.model

    @property
    def pre(self) -> str:
        """tokenizer.ggml.pre as written in the file ("" when absent)."""
        return self.vocab.pre

    @property
    def bos_id(self) -> int | None:
        return self.vocab.special["bos"]

    @property
    def eos_id(self) -> int | None:
        return self.vocab.special["eos"]

    @property
    def eog_ids(self) -> frozenset[int]:
        """Tokens that end generation (llama_vocab_is_eog)."""
        return self.vocab.eog_ids

    @property
    def add_bos(self) -> bool:
        return self.vocab.add_bos

    @property
    def add_eos(self) -> bool:
        return self.vocab.add_eos

    def token_text(self, token: int) -> str:
        """The token's text as stored in the vocabulary (llama_vocab_get_text)."""
        return self.vocab.texts[self._check(token)]

    def is_control(self, token: int) -> bool:
        return bool(self.vocab.attrs[self._check(token)] & Attr.CONTROL)

    def _check(self, token: int) -> int:
        if not 0 <= token < self.vocab.n_tokens:
            raise ValueError(f"token id {token} is outside the vocabulary "
                             f"(0..{self.vocab.n_tokens - 1})")
        return token

    # -- encoding ---------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``: llama_tokenize(text, add_special, parse_special).

        ``text`` must have a UTF-8 encoding (llama.cpp tokenizes UTF-8 bytes): a lone
        surrogate raises :class:`gguflm.TextError`, a ValueError."""
        bad = _SURROGATE.search(text)
        if bad:
            raise TextError(f"text holds a lone surrogate U+{ord(bad.group()):04X} at index {bad.start()}: "
                            "it is not valid Unicode and has no UTF-8 encoding")
        v = self.vocab
        out: list[int] = []
        if add_special and v.add_bos:
            out.append(self._required("bos"))
        prev_special = True
        for piece in self._partition(text, parse_special):
            if isinstance(piece, int):
                out.append(piece)
                prev_special = True
                continue
            if v.kind == "spm":
                if v.add_space_prefix and prev_special:
                    piece = " " + piece
                piece = piece.replace(" ", SPACE)
            elif v.escape_whitespaces:
                piece = piece.replace(" ", SPACE)
            out.extend(self._encoder.encode(piece))
            prev_special = False
        if add_special and v.add_eos:
            out.append(self._required("eos"))
        return out

    def _required(self, slot: str) -> int:
        tid = self.vocab.special[slot]
        if tid is None:
            raise ValueError(f"the vocabulary asks for a {slot.upper()} token but has none")
        return tid

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Text pieces and special-token ids, in order (tokenizer_st_partition)."""
        v = self.vocab
        parts: list[str | int] = [text] if text else []
        for tid in v.special_order:
            attr = v.attrs[tid]
            if not parse_special and attr & HIDDEN:
                continue
            special = v.texts[tid]
            new: list[str | int] = []
            for p in parts:
                hit = -1 if isinstance(p, int) else p.find(special)
                if hit < 0:
                    new.append(p)
                    continue
                pos = 0
                while hit >= 0:
                    left = p[pos:hit]
                    if attr & Attr.LSTRIP:
                        left = left.rstrip(C_SPACES)
                    if left:
                        new.append(left)
                    new.append(tid)
                    pos = hit + len(special)
                    if attr & Attr.RSTRIP:
                        pos = len(p) - len(p[pos:].lstrip(C_SPACES))
                    hit = p.find(special, pos)
                if pos < len(p):
                    new.append(p[pos:])
            parts = new
        return parts

    # -- decoding ---------------------------------------------------------------------
    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (llama_token_to_piece with lstrip 0): for streaming."""
        if not special and self.vocab.attrs[self._check(token)] & HIDDEN:
            return b""
        piece = self._pieces[token]
        if piece is None:
            piece = self._pieces[token] = self._render(token)
        return piece

    def _render(self, token: int) -> bytes:
        """The piece of a token with special tokens rendered (llama.cpp's piece cache)."""
        v = self.vocab
        text, attr = v.texts[token], v.attrs[token]
        if attr & (HIDDEN | Attr.USER_DEFINED):
            return text.encode()
        if attr & Attr.NORMAL:
            if v.kind == "spm" or v.escape_whitespaces:
                return text.replace(SPACE, " ").encode()
            return _gpt2_bytes(text)
        if attr & Attr.BYTE:
            return bytes([_byte_value(text)])
        return b""

    def decode_bytes(self, ids: Iterable[int], *, remove_special: bool = False,
                     unparse_special: bool = False) -> bytes:
        """llama_detokenize(ids, remove_special, unparse_special), as bytes."""
        v = self.vocab
        ids = list(ids)
        strip_space = v.add_space_prefix
        if remove_special and v.add_bos and ids and ids[0] == v.special["bos"]:
            strip_space = False
            ids = ids[1:]
        if remove_special and v.add_eos and ids and ids[-1] == v.special["eos"]:
            ids = ids[:-1]
        pieces = [self.token_to_piece(t, unparse_special) for t in ids]
        if strip_space and pieces and pieces[0][:1] == b" ":
            pieces[0] = pieces[0][1:]
        data = b"".join(pieces)
        if v.clean_spaces and any(h in data for h in _CLEAN_HINTS):
            for pattern, repl in zip(_CLEAN, _CLEAN_REPL):
                data = pattern.sub(repl, data)
        return data

    def decode(self, ids: Iterable[int], *, remove_special: bool = False,
               unparse_special: bool = False) -> str:
        """``decode_bytes`` as text (invalid UTF-8, e.g. a split character, becomes U+FFFD)."""
        return self.decode_bytes(ids, remove_special=remove_special,
                                 unparse_special=unparse_special).decode("utf-8", "replace")

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
                f"bos={self.bos_id}, eos={self.eos_id})")


def _gpt2_bytes(text: str) -> bytes:
    """A byte-level BPE token's bytes (llama_decode_text, including its marker for
    characters outside GPT-2's byte alphabet)."""
    out = bytearray()
    for ch in text:
        b = CHAR_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode().hex().encode() + text.encode() + b"]"
    return bytes(out)


def _byte_value(text: str) -> int:
    """The byte of a ``<0xHH>`` token (the form is checked when the vocabulary is loaded)."""
    return int(text[3:5], 16)
