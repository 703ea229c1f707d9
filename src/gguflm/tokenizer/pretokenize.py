"""BPE pre-tokenizers: llama.cpp's table of regexes per ``tokenizer.ggml.pre``.

A pre-tokenizer is a sequence of *steps*. The text starts as one span; each step
splits every span into its matches and the gaps between them ("isolated" splitting:
both become words), in order. The words are then BPE-encoded one by one.

Steps come in the three flavours of llama.cpp's ``unicode_regex_split``:

* :class:`Regex` with a ``\\p{..}`` class: run on the COLLAPSE view of the text
  (llama.cpp's collapsed ``std::regex``; see :mod:`gguflm.tokenizer.unicode`);
* :class:`Regex` without one: run on the WIDE view (llama.cpp's ``std::wregex``);
* hand-written splitters, for the patterns llama.cpp special-cases (GPT-2, Llama 3,
  Qwen2, Qwen3.5, Kimi-K2, the AFMoE digit grouping, newline runs). llama.cpp's
  versions differ slightly from the regexes they replace; ours are regexes over the
  class views that reproduce llama.cpp's splitters, not the original regexes.

All views keep one character per code point, so spans index the original text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

from gguflm.tokenizer import unicode as uni

Span = tuple[int, int]
# A step splits view[start:end] and appends the new spans (absolute offsets) to out.
SplitFn = Callable[[str, int, int, list[Span]], None]

_VIEWS: dict[str, Callable[[str], str]] = {
    "collapse": uni.collapse, "wide": uni.wide, "kimi": uni.kimi, "text": lambda t: t,
}


def translate_pattern(pattern: str, collapsed: bool) -> str:
    """An ECMAScript pattern of llama.cpp's table as a Python ``re`` pattern (ASCII mode).

    ``\\p{X}`` becomes the collapsed class of X (only on the COLLAPSE view); ``$``
    outside a class becomes ``\\Z`` (ECMAScript's ``$`` never matches before a final
    newline). Everything else means the same in both dialects for these patterns.
    """
    out: list[str] = []
    inside = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and pattern.startswith("p{", i + 1):
            close = pattern.index("}", i)
            name = pattern[i + 3:close]
            if not collapsed or name not in uni.CATEGORY_CLASS:
                raise ValueError(f"unsupported class \\p{{{name}}} in {pattern!r}")
            body = uni.CATEGORY_CLASS[name]
            out.append(body if inside else f"[{body}]")
            i = close + 1
            continue
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not inside:
            inside = True
        elif c == "]" and inside:
            inside = False
        elif c == "$" and not inside:
            c = r"\Z"
        out.append(c)
        i += 1
    return "".join(out)


def _split_with(pattern: re.Pattern[str]) -> SplitFn:
    """Matches and the gaps between them become spans (empty ones are dropped: an empty
    word yields no token, and llama.cpp's zero-length offsets yield none either)."""

    def split(view: str, start: int, end: int, out: list[Span]) -> None:
        seg = view if (start == 0 and end == len(view)) else view[start:end]
        last = 0
        for m in pattern.finditer(seg):
            a, b = m.span()
            if a > last:
                out.append((start + last, start + a))
            if b > a:
                out.append((start + a, start + b))
            last = b
        if last < len(seg):
            out.append((start + last, end))

    return split


@dataclass(frozen=True)
class Regex:
    """One regex of llama.cpp's table, as written there (ECMAScript dialect)."""

    pattern: str
    tiling = None  # matches leave gaps in general

    @cached_property
    def view(self) -> str:
        return "collapse" if "\\p{" in self.pattern else "wide"

    @cached_property
    def split(self) -> SplitFn:
        py = translate_pattern(self.pattern, self.view == "collapse")
        return _split_with(re.compile(py, re.ASCII))


@dataclass(frozen=True)
class Custom:
    """A hand-written llama.cpp splitter, reproduced on ``view`` either by a regex whose
    matches tile any text (``pattern``) or by a split function (``splitter``)."""

    name: str
    view: str
    pattern: Callable[[], re.Pattern[str]] | None = None
    splitter: Callable[[], SplitFn] | None = None

    @cached_property
    def tiling(self) -> re.Pattern[str] | None:
        """The regex whose matches cover every character (no gaps), if any."""
        return self.pattern() if self.pattern else None

    @cached_property
    def split(self) -> SplitFn:
        if self.splitter is not None:
            return self.splitter()
        assert self.tiling is not None
        return _split_with(self.tiling)


Step = Regex | Custom

# -- the special-cased splitters, as regexes over the COLLAPSE / KIMI alphabets --------
# Collapsed classes: letters, numbers, marks and White_Space (\x0b stands for non-ASCII
# White_Space). llama.cpp's `\s` is White_Space; 0x1C-0x1F are not spaces there.
_L, _N, _M, _WS = r"A-Za-z\xd2", r"0-9\xd1", r"\xd4", r"\t\n\x0b\x0c\r "
_CONTRACTION_CS = r"'s|'t|'re|'ve|'m|'ll|'d"
_CONTRACTION_CI = r"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]"
_SPACES = rf"[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"


def _gpt2() -> re.Pattern[str]:
    # 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S), where a lone
    # space/tab/newline before a non-space becomes its own word (llama.cpp's \s+ fallback).
    return re.compile(rf"{_CONTRACTION_CS}| ?[{_L}]+| ?[{_N}]+| ?[^{_WS}{_L}{_N}]+"
                      rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+")


def _llama3_like(numbers: str, letters: str, others_excluded: str) -> Callable[[], re.Pattern[str]]:
    def build() -> re.Pattern[str]:
        return re.compile(rf"(?:{_CONTRACTION_CI})|[^\r\n{_L}{_N}]?[{letters}]+|{numbers}"
                          rf"| ?[^{_WS}{others_excluded}]+[\r\n]*|{_SPACES}")
    return build


def _kimi() -> re.Pattern[str]:
    # Han runs first; letter words exclude Han; a Han code point that is not a letter
    # (an unassigned one in the Han blocks) still counts as "other" inside symbol runs.
    han, all_letters = "\xd6\xd7", _L + "\xd6"
    return re.compile(rf"[{han}]+|[^\r\n{all_letters}{_N}]?[{_L}]+(?:{_CONTRACTION_CI})?"
                      rf"|[{_N}]{{1,3}}| ?[^{_WS}{all_letters}{_N}]+[\r\n]*|{_SPACES}")


def _digit_groups() -> SplitFn:
    """llama.cpp's AFMoE digit splitter: each run of numbers is cut into groups of three
    counted from the right; the text before a run is glued to the run's first group."""
    runs = re.compile(rf"[{_N}]+")

    def split(view: str, start: int, end: int, out: list[Span]) -> None:
        prev = start
        for m in runs.finditer(view, start, end):
            a, b = m.span()
            cut = a + ((b - a) % 3 or 3)
            while cut <= b:
                out.append((prev, cut))
                prev, cut = cut, cut + 3
        if prev < end:
            out.append((prev, end))

    return split


def _newline_runs() -> re.Pattern[str]:
    return re.compile(r"[^\n]+|\n+")


GPT2 = Custom("gpt2", "collapse", pattern=_gpt2)
LLAMA3 = Custom("llama3", "collapse", pattern=_llama3_like(rf"[{_N}]{{1,3}}", _L, _L + _N))
QWEN2 = Custom("qwen2", "collapse", pattern=_llama3_like(rf"[{_N}]", _L, _L + _N))
QWEN35 = Custom("qwen35", "collapse", pattern=_llama3_like(rf"[{_N}]", _L + _M, _L + _M + _N))
KIMI_K2 = Custom("kimi-k2", "kimi", pattern=_kimi)
DIGIT_GROUPS = Custom("digit-groups", "collapse", splitter=_digit_groups)
NEWLINES = Custom("newlines", "text", pattern=_newline_runs)

# -- llama.cpp's regexes (the models' tokenizer.json patterns, adapted by llama.cpp) ---
_CI = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_TAIL = r"\s*[\r\n]+|\s+(?!\S)|\s+"
_SYMBOLS_SLASH = r" ?[^\s\p{L}\p{N}]+[\r\n/]*|"
_PUNCT_ASCII = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
_CJK_KANA = "[一-龥\u3040-ゟ゠-ヿ]+"
_CJK_HANGUL = "[一-龥ࠀ-一가-\ud7ff]+"
_NORDIC = r" ?[^(\s|.,!?…。，、।۔،)]+"
# Letter classes of the cased-word patterns (GPT-4o and relatives). In the collapsed view
# every non-ASCII letter counts as both upper- and lowercase, as in llama.cpp.
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_UP_L, _LO_L = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_UP_LM, _LO_LM = r"((?=[\p{L}\p{M}])([^a-z]))", r"((?=[\p{L}\p{M}])([^A-Z]))"


def _cased(up: str, lo: str, suffix: str) -> str:
    """GPT-4o-style words: upper* lower+ | upper+ lower* (each with an optional suffix)."""
    lead = r"[^\r\n\p{L}\p{N}]?"
    return f"{lead}{up}*{lo}+{suffix}|{lead}{up}+{lo}*{suffix}"


_GPT4O_WORDS = _cased(_UP_L, _LO_L, _CI + "?")
_TEKKEN_WORDS = _cased(_UP_L, _LO_L, "")
_GRANITE_WORDS = _cased(_UP_LM, _LO_LM, _CI + "?")
_CASED_WORDS = _cased(_UPPER, _LOWER, _CI + "?")

PRE_TYPES: dict[str, tuple[Step, ...]] = {
    "default": (Regex(r"[\p{P}\$\+<=>\^~\|]+"), GPT2, Regex(r"\p{N}+"), Regex("[0-9][0-9][0-9]")),
    "llama3": (LLAMA3,),
    "jais2": (Regex(_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)"
                    r"|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"),),
    "deepseek-llm": (
        Regex("[\r\n]"),
        Regex("\\s?["
              "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-"
              "\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-"
              "\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
              "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00"
              "-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-"
              "\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-"
              "\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-"
              "\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
              "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
              "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13"
              "-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
              "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
              "\U0001e900-\U0001e943"
              "]+"),
        Regex("\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+"),
        Regex(r"\s+$"),
        Regex(_CJK_HANGUL),
        Regex(r"\p{N}+"),
    ),
    "deepseek3-llm": (Regex(r"\p{N}{1,3}"), Regex(_CJK_KANA),
                      Regex(_PUNCT_ASCII + "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                            "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")),
    "spark2_5": (Regex(r"\p{N}{1,3}"), Regex(_CJK_KANA),
                 Regex(_PUNCT_ASCII + "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                       "| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+"),
                 Regex(r"\p{N}")),
    "youtu": (Regex("[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|" + _CJK_KANA),
              Regex(_CASED_WORDS + r"|\p{N}|" + _SYMBOLS_SLASH + _TAIL)),
    "deepseek-coder": (Regex("[\r\n]"), Regex(r"\s?\p{L}+"), Regex(r"\s?\p{P}+"),
                       Regex(_CJK_HANGUL), Regex(r"\p{N}")),
    "falcon": (Regex(r"[\p{P}\$\+<=>\^~\|`]+"), GPT2, Regex("[0-9][0-9][0-9]")),
    "starcoder": (Regex(r"\p{N}"), GPT2),
    "gpt2": (GPT2,),
    "qwen2": (QWEN2,),
    "qwen35": (QWEN35,),
    "poro": (Regex(_NORDIC),),
    "viking": (Regex(_NORDIC), Regex(r"\p{N}")),
    "tekken": (Regex(_TEKKEN_WORDS + r"|\p{N}|" + _SYMBOLS_SLASH + _TAIL),),
    "chameleon": (Regex("<sentinel:[0-9]+>"), Regex("(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z"),
                  Regex("([\\t\\n]|    |  )"), Regex(r"\p{N}"), Regex(r"[\p{P}!-/:-@\[-`{-~]"),
                  GPT2),
    "gpt4o": (Regex(_GPT4O_WORDS + r"|\p{N}{1,3}|" + _SYMBOLS_SLASH + _TAIL),),
    "granite-emb-multi": (Regex(_GRANITE_WORDS + r"|\p{N}{1,3}|" + _SYMBOLS_SLASH + _TAIL),),
    "tiny-aya": (DIGIT_GROUPS, Regex(_CASED_WORDS + r"|\p{N}{1,3}|" + _SYMBOLS_SLASH + _TAIL)),
    "kimi-k2": (KIMI_K2,),
    "superbpe": (Regex(r"\p{N}+"), Regex(r"(?=(\d{3})+(?!\d))")),
    "bailingmoe": (Regex(r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"),),
    "seed-coder": (Regex(_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|"
                         + _TAIL),),
    "ufakzeka": (Regex(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|" + _TAIL),),
    "afmoe": (DIGIT_GROUPS,
              Regex("[一-鿿㐀-䶿豈-\ufaff\u3040-ゟ゠-ヿ･-ﾟ⼀-\u2fdfเ-\u0e7f\u0e80-\u0effក-\u17ffက-႟"
                    "ꩠ-ꩿꧠ-\ua9ff가-\ud7afᄀ-ᇿ]+"),
              Regex(_PUNCT_ASCII + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|"
                    + _TAIL)),
    "laguna": (NEWLINES, QWEN2),
    "exaone-moe": (Regex(_CI + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                         r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"),),
    "newlines": (NEWLINES,),
    "minicpm5": (Regex(r"\p{N}{1,3}"),
                 Regex(_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|" + _TAIL)),
}


@dataclass(frozen=True)
class PreSetting:
    """What one ``tokenizer.ggml.pre`` value selects: the pre-tokenizer and the vocabulary
    flags llama.cpp sets with it (the BPE defaults otherwise)."""

    pre_type: str
    clean_spaces: bool = True
    ignore_merges: bool = False
    add_bos: bool = False
    no_bos: bool = False            # the default BOS id is dropped (ChatGLM)
    escape_whitespaces: bool = False  # spaces become U+2581 before BPE (SPM-style BPE)
    byte_encode: bool = True          # GPT-2 byte alphabet; False: raw UTF-8, <0xXX> fallback
    whole_newline_words: bool = False  # a word of only newlines that is a token stays whole
    force_add_bos: bool = False       # BOS is added even when add_bos_token says false


def _names(names: str, **kw) -> dict[str, PreSetting]:
    return {n: PreSetting(**kw) for n in names.split()}


_KEEP = dict(clean_spaces=False)
# tokenizer.ggml.pre -> setting (llama_vocab::impl::load in llama-vocab.cpp)
PRE_SETTINGS: dict[str, PreSetting] = {
    **_names("default", pre_type="default"),
    **_names("minicpm5", pre_type="minicpm5", ignore_merges=True),
    **_names("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
             pre_type="llama3", ignore_merges=True, add_bos=True),
    **_names("deepseek-llm", pre_type="deepseek-llm", **_KEEP),
    **_names("deepseek-coder", pre_type="deepseek-coder", **_KEEP),
    **_names("deepseek-v3", pre_type="deepseek3-llm", **_KEEP),
    **_names("spark2_5", pre_type="spark2_5", **_KEEP),
    **_names("youtu", pre_type="youtu", ignore_merges=True, **_KEEP),
    **_names("falcon", pre_type="falcon"),
    **_names("mpt", pre_type="gpt2"),
    **_names("starcoder", pre_type="starcoder"),
    **_names("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert",
             pre_type="gpt2"),
    **_names("jais-2", pre_type="jais2"),
    **_names("gemma4 granite-embed-multi-311m", pre_type="newlines", escape_whitespaces=True,
             byte_encode=False, whole_newline_words=True, force_add_bos=True),
    **_names("sarvam-moe", pre_type="newlines", escape_whitespaces=True, byte_encode=False, **_KEEP),
    **_names("jina-v1-en jina-v2-code roberta-bpe", pre_type="gpt2"),  # + add_sep (WordPiece only)
    **_names("refact", pre_type="starcoder"),
    **_names("command-r", pre_type="starcoder", **_KEEP),
    **_names("qwen2 deepseek-r1-qwen kormo f2llmv2", pre_type="qwen2", **_KEEP),
    **_names("qwen35", pre_type="qwen35", **_KEEP),
    **_names("stablelm2", pre_type="qwen2"),
    **_names("olmo", pre_type="gpt2"),
    **_names("dbrx", pre_type="llama3"),
    **_names("smaug-bpe", pre_type="llama3"),
    **_names("poro-chat", pre_type="poro", **_KEEP),
    **_names("chatglm-bpe", pre_type="llama3", no_bos=True),
    **_names("glm4 glm5", pre_type="llama3", no_bos=True, ignore_merges=True),
    **_names("viking", pre_type="viking", **_KEEP),
    **_names("jais", pre_type="gpt2"),
    **_names("tekken", pre_type="tekken", ignore_merges=True, add_bos=True, **_KEEP),
    **_names("smollm", pre_type="starcoder", **_KEEP),
    **_names("codeshell", pre_type="starcoder"),
    **_names("bloom gpt3-finnish", pre_type="poro"),
    **_names("exaone", pre_type="starcoder"),
    **_names("exaone4", pre_type="gpt2"),
    **_names("exaone-moe", pre_type="exaone-moe"),
    **_names("chameleon", pre_type="chameleon", add_bos=True, **_KEEP),
    **_names("minerva-7b", pre_type="starcoder"),
    **_names("megrez", pre_type="qwen2"),
    **_names("gpt-4o llama4 kanana2 talkie", pre_type="gpt4o", **_KEEP),
    **_names("granite-embed-multi-97m", pre_type="granite-emb-multi", ignore_merges=True, **_KEEP),
    **_names("tiny_aya cohere2moe", pre_type="tiny-aya", **_KEEP),
    **_names("superbpe", pre_type="superbpe", **_KEEP),
    **_names("trillion granite-docling", pre_type="gpt2", **_KEEP),
    **_names("bailingmoe bailingmoe2 llada-moe", pre_type="bailingmoe", **_KEEP),
    **_names("seed-coder", pre_type="seed-coder", **_KEEP),
    **_names("hunyuan", pre_type="qwen2", **_KEEP),
    **_names("hunyuan-dense hy_v4 joyai-llm", pre_type="deepseek3-llm", **_KEEP),
    **_names("kimi-k2", pre_type="kimi-k2", **_KEEP),
    **_names("ufakzeka", pre_type="ufakzeka", **_KEEP),
    **_names("grok-2", pre_type="qwen2", **_KEEP),
    **_names("afmoe", pre_type="afmoe", **_KEEP),
    **_names("laguna", pre_type="laguna", **_KEEP),
    **_names("minimax-m2", pre_type="gpt4o", **_KEEP),
    **_names("solar-open", pre_type="qwen2", **_KEEP),
    **_names("mellum2", pre_type="starcoder"),
}


class PreTokenizer:
    """Splits a text fragment into the words that BPE encodes, as llama.cpp does."""

    def __init__(self, pre_type: str):
        self.pre_type = pre_type
        self.steps = PRE_TYPES[pre_type]

    def split(self, text: str) -> list[str]:
        """The words of ``text`` (concatenated, they give ``text`` back)."""
        if not text:
            return []
        views: dict[str, str] = {}

        def view_of(step: Step) -> str:
            view = views.get(step.view)
            if view is None:
                view = views[step.view] = _VIEWS[step.view](text)
            return view

        spans: list[Span] = [(0, len(text))]
        *head, last = self.steps
        for step in head:
            view, out, fn = view_of(step), [], step.split
            for start, end in spans:
                fn(view, start, end, out)
            spans = out
        view = view_of(last)
        if last.tiling is None:
            out = []
            for start, end in spans:
                last.split(view, start, end, out)
            return [text[a:b] for a, b in out]
        # Fast path: the last step's matches tile each span, so findall gives the words
        # (or, on a translated view, their lengths).
        findall = last.tiling.findall
        if len(spans) == 1 and view is text:
            return findall(text)
        words: list[str] = []
        for start, end in spans:
            pieces = findall(view[start:end])
            if view is text:
                words += pieces
            else:  # same lengths as in the text: cut the text at the running offsets
                cuts = list(accumulate(map(len, pieces), initial=start))
                words += map(text.__getitem__, map(slice, cuts, cuts[1:]))
        return words
