"""Characters as llama.cpp's pre-tokenizer sees them (src/unicode.cpp there).

llama.cpp does not match ``\\p{L}``, ``\\p{N}``, ``\\s``... against the full Unicode
database of a regex engine. It classifies each code point through its own table
(Unicode 15.1 general categories, :mod:`unicode_data`) and then either

* runs hand-written splitters (GPT-2, Llama 3, Qwen2...) on those classes, or
* runs ``std::regex`` (ECMAScript, "C" locale) on a *collapsed* copy of the text in
  which every non-ASCII code point is replaced by one byte naming its class, with
  each ``\\p{X}`` of the pattern rewritten to that byte plus the ASCII members of X.

To reproduce it exactly we build the same views of the text (one character per code
point, so match offsets carry over to the original string) and match them with
Python's ``re`` in ASCII mode, whose ``\\s \\d \\w \\b`` are those of the "C" locale.

Views (all ``str.translate`` tables, one entry per code point):

* ``COLLAPSE``: ASCII unchanged; non-ASCII White_Space -> ``\\x0b``; else letter
  ``\\xd2``, number ``\\xd1``, punctuation ``\\xd3``, mark ``\\xd4``, symbol ``\\xd5``,
  anything else (other, separator, unassigned) ``\\xd0``.
* ``WIDE``: the text itself, non-ASCII White_Space -> ``\\x0b`` (``std::wregex``
  path, for patterns without ``\\p{..}``).
* ``KIMI``: ``COLLAPSE`` plus the Han ranges of llama.cpp's Kimi-K2 splitter: Han
  letters ``\\xd6``, other code points in those ranges ``\\xd7``.
"""

from __future__ import annotations

from functools import cache

from gguflm.tokenizer.unicode_data import RANGES

MAX_CODEPOINT = 0x110000

# Unicode's White_Space property: llama.cpp's `\s` for every pre-tokenizer.
WHITESPACE = frozenset([0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680,
                        *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000])

# Collapsed byte for each class (llama.cpp's k_ucat_cpt; 0xD0 is its fallback).
COLLAPSED_WS = "\x0b"
COLLAPSED = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5",
             "Z": "\xd0", "C": "\xd0", "U": "\xd0"}
HAN_LETTER, HAN_OTHER = "\xd6", "\xd7"

# The character-class contents that replace \p{X} in a collapsed pattern: the class
# byte plus the ASCII members of X (llama.cpp's k_ucat_map). \p{Lu} etc. are all letters.
CATEGORY_CLASS = {
    "N": "\xd1" + "0-9",
    "L": "\xd2" + "A-Za-z",
    "P": "\xd3" + r"!-#%-*,-/:;?@\[-\]_{}",
    "M": "\xd4",
    "S": "\xd5" + r"$+<->^`|~",
}
for _sub in ("Lu", "Ll", "Lt", "Lm", "Lo"):
    CATEGORY_CLASS[_sub] = CATEGORY_CLASS["L"]

# Han ranges of llama.cpp's unicode_cpt_is_han (used by the Kimi-K2 pre-tokenizer only).
HAN_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF),
              (0x2F800, 0x2FA1F))


@cache
def classes() -> str:
    """The class letter (L N P S M Z C U) of every code point: a 0x110000-char string."""
    bounds = [first for first, _ in RANGES[1:]] + [MAX_CODEPOINT]
    return "".join(cls * (end - first) for (first, cls), end in zip(RANGES, bounds))


def _with_ascii_and_whitespace(table: list[str]) -> str:
    table[:128] = [chr(c) for c in range(128)]
    for cp in WHITESPACE:
        if cp >= 128:
            table[cp] = COLLAPSED_WS
    return "".join(table)


@cache
def collapse_table() -> str:
    """``str.translate`` table of the COLLAPSE view (see the module docstring)."""
    return _with_ascii_and_whitespace([COLLAPSED[c] for c in classes()])


@cache
def wide_table() -> dict[int, str]:
    """``str.translate`` table of the WIDE view: non-ASCII White_Space -> \\x0b."""
    return {cp: COLLAPSED_WS for cp in WHITESPACE if cp >= 128}


@cache
def kimi_table() -> str:
    """``str.translate`` table of the KIMI view: COLLAPSE with the Han ranges marked."""
    table = list(collapse_table())
    cls = classes()
    for lo, hi in HAN_RANGES:
        for cp in range(lo, hi + 1):
            table[cp] = HAN_LETTER if cls[cp] == "L" else HAN_OTHER
    return "".join(table)


def collapse(text: str) -> str:
    """The COLLAPSE view of ``text`` (same length, one char per code point)."""
    return text if text.isascii() else text.translate(collapse_table())


def wide(text: str) -> str:
    """The WIDE view of ``text``."""
    return text if text.isascii() else text.translate(wide_table())


def kimi(text: str) -> str:
    """The KIMI view of ``text``."""
    return text if text.isascii() else text.translate(kimi_table())


# GPT-2's byte <-> unicode alphabet: printable bytes stand for themselves, the others
# are shifted to 256 + n in byte order (the byte-level BPE of GPT-2, used by llama.cpp).
def _gpt2_byte_chars() -> list[str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = [""] * 256, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_TO_CHAR: tuple[str, ...] = tuple(_gpt2_byte_chars())
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# bytes.decode("latin-1").translate(BYTE_ENCODE) maps raw bytes to GPT-2 characters.
BYTE_ENCODE: dict[int, str] = dict(enumerate(BYTE_TO_CHAR))
