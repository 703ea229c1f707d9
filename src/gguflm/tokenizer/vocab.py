"""The vocabulary, read from GGUF metadata exactly as llama.cpp's ``llama_vocab::load``.

Everything comes from the ``tokenizer.ggml.*`` keys of the key table below; a key of
the wrong type is an error that names it (llama.cpp refuses those files too). What
llama.cpp derives on top of the metadata is derived here the same way:

* per-model defaults (SPM: BOS 1, EOS 2, UNK 0, add BOS, space prefix; BPE: ids 11,
  clean-up of spaces) and the per-``tokenizer.ggml.pre`` flags (:data:`PRE_SETTINGS`);
* special tokens found by their text when the metadata does not name them (EOT, EOM,
  FIM tokens), the set of end-of-generation tokens, "unused" control tokens, and the
  token attributes it forces (control, user-defined, lstrip/rstrip for Phi-3...).

Two places where llama.cpp's order is an accident of its C++ library, and ours a rule:

* it detects EOT/FIM tokens while walking a hash map; we take the candidates in the
  order of its lists. Only the reported EOT/FIM id can differ, and only when a
  vocabulary holds two spellings of one of them (then also which FIM pad/repo token
  ends generation);
* it sorts special tokens by length with an unstable sort; ours keeps equal lengths in
  id order. This matters only for two equal-length special tokens that can overlap in
  a text, which none of the tested vocabularies has.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gguflm.errors import GGUFError
from gguflm.gguf.reader import ValueType
from gguflm.tokenizer.pretokenize import PRE_SETTINGS, PreSetting


class Attr:
    """llama.cpp's llama_token_attr bits (plain ints: a token's attributes are their OR)."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# tokenizer.ggml.token_type values (llama_token_type) -> attribute; others: UNDEFINED.
TOKEN_TYPE_ATTR = {0: Attr.UNDEFINED, 1: Attr.NORMAL, 2: Attr.UNKNOWN, 3: Attr.CONTROL,
                   4: Attr.USER_DEFINED, 5: Attr.UNUSED, 6: Attr.BYTE}

_STR, _U32, _BOOL = (ValueType.STRING,), (ValueType.UINT32,), (ValueType.BOOL,)
_STR_ARRAY = (ValueType.ARRAY, ValueType.STRING)
_I32_ARRAY = (ValueType.ARRAY, ValueType.INT32)
_F32_ARRAY = (ValueType.ARRAY, ValueType.FLOAT32)

# The metadata keys a vocabulary is built from, with the types llama.cpp accepts.
KEYS: dict[str, tuple[tuple[ValueType, ...], ...]] = {
    "general.name": (_STR,),
    "general.architecture": (_STR,),
    "tokenizer.ggml.model": (_STR,),
    "tokenizer.ggml.pre": (_STR,),
    "tokenizer.ggml.tokens": (_STR_ARRAY,),
    "tokenizer.ggml.scores": (_F32_ARRAY, _I32_ARRAY),
    "tokenizer.ggml.token_type": (_I32_ARRAY,),
    "tokenizer.ggml.merges": (_STR_ARRAY,),
}

# Boolean flags: (Vocab field, key). llama.cpp also reads remove_extra_whitespaces and
# add_sep_token, but only its UGM (T5) and WordPiece tokenizers use them: their types are
# checked (llama.cpp refuses a wrong one too), their values not kept.
FLAG_KEYS: tuple[tuple[str, str], ...] = (
    ("add_space_prefix", "tokenizer.ggml.add_space_prefix"),
    ("remove_extra_whitespaces", "tokenizer.ggml.remove_extra_whitespaces"),
    ("add_bos", "tokenizer.ggml.add_bos_token"),
    ("add_eos", "tokenizer.ggml.add_eos_token"),
    ("add_sep", "tokenizer.ggml.add_sep_token"),
)
for _, _key in FLAG_KEYS:
    KEYS[_key] = (_BOOL,)

# Special-token slots and the keys that set them, in llama.cpp's order (the deprecated
# prefix/suffix/middle keys come last and win over fim_pre/suf/mid).
SPECIAL_ID_KEYS: tuple[tuple[str, str], ...] = (
    ("bos", "tokenizer.ggml.bos_token_id"),
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("eot", "tokenizer.ggml.eot_token_id"),
    ("eom", "tokenizer.ggml.eom_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"),
    ("mask", "tokenizer.ggml.mask_token_id"),
    ("fim_pre", "tokenizer.ggml.fim_pre_token_id"),
    ("fim_suf", "tokenizer.ggml.fim_suf_token_id"),
    ("fim_mid", "tokenizer.ggml.fim_mid_token_id"),
    ("fim_pad", "tokenizer.ggml.fim_pad_token_id"),
    ("fim_rep", "tokenizer.ggml.fim_rep_token_id"),
    ("fim_sep", "tokenizer.ggml.fim_sep_token_id"),
    ("fim_pre", "tokenizer.ggml.prefix_token_id"),
    ("fim_suf", "tokenizer.ggml.suffix_token_id"),
    ("fim_mid", "tokenizer.ggml.middle_token_id"),
)
for _, _key in SPECIAL_ID_KEYS:
    KEYS[_key] = (_U32,)

# tokenizer.ggml.model -> (kind, default special ids)
MODELS: dict[str, tuple[str, dict[str, int]]] = {
    "llama": ("spm", {"bos": 1, "eos": 2, "unk": 0}),
    "gpt2": ("bpe", {"bos": 11, "eos": 11}),
    "gemma4": ("bpe", {}),
}

# Special tokens recognised by their text when the metadata does not name them.
DETECTED: dict[str, tuple[str, ...]] = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
            "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
            "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# Tokens that end generation, by text (besides EOS/EOT/EOM and the FIM pad/rep/sep).
EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))
# gpt-oss: always rendered, whatever their type says.
ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")
SPECIAL_ATTRS = Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN


@dataclass
class Vocab:
    """A vocabulary as llama.cpp holds it after loading (see the module docstring)."""

    model: str                        # tokenizer.ggml.model
    kind: str                         # "spm" or "bpe"
    pre: str                          # tokenizer.ggml.pre as written ("" when absent)
    setting: PreSetting | None        # BPE only: pre-tokenizer and its flags
    texts: list[str]
    scores: list[float]
    attrs: list[int]
    token_to_id: dict[str, int]
    ranks: dict[str, int]             # BPE merge rule "left right" -> rank
    special: dict[str, int | None]    # bos, eos, eot, eom, unk, sep, pad, mask, fim_*
    add_bos: bool                     # encode(add_special=True) adds BOS / EOS
    add_eos: bool
    add_space_prefix: bool            # SPM: " " before a text piece that starts the text or
                                      # follows a special token; decode drops it again
    clean_spaces: bool                # decode removes spaces before punctuation
    escape_whitespaces: bool          # spaces become "▁" before merging
    ignore_merges: bool               # a BPE word that is a token is taken whole
    eog_ids: frozenset[int] = frozenset()
    special_order: tuple[int, ...] = field(default=())  # partition order: longest text first

    @property
    def n_tokens(self) -> int:
        return len(self.texts)


def _get(meta: Mapping[str, Any], types: Mapping[str, tuple], key: str) -> Any:
    """The value of ``key`` (None when absent); GGUFError when its type is not accepted."""
    if key not in meta:
        return None
    accepted = KEYS[key]
    if tuple(types[key]) not in accepted:
        names = " or ".join("[".join(t.name for t in a) + "]" * (len(a) - 1) for a in accepted)
        got = "[".join(t.name for t in types[key]) + "]" * (len(types[key]) - 1)
        raise GGUFError(f"metadata key {key} has type {got}, expected {names}")
    return meta[key]


def _required(meta, types, key: str) -> Any:
    value = _get(meta, types, key)
    if value is None:
        raise GGUFError(f"missing metadata key {key}: not a GGUF file with a vocabulary")
    return value


def load_vocab(meta: Mapping[str, Any], types: Mapping[str, tuple]) -> Vocab:
    """Build the vocabulary from GGUF metadata (``GGUFFile.metadata`` and ``.metadata_types``)."""
    model = _required(meta, types, "tokenizer.ggml.model")
    pre = _get(meta, types, "tokenizer.ggml.pre") or ""
    if model not in MODELS:
        raise GGUFError(f"tokenizer model {model!r} is not supported (supported: "
                        f"{', '.join(MODELS)})")
    kind, defaults = MODELS[model]
    special: dict[str, int | None] = {slot: None for slot, _ in SPECIAL_ID_KEYS}
    special.update(defaults)
    if model == "gemma4":
        pre = "gemma4"

    setting: PreSetting | None = None
    if kind == "bpe":
        setting = _pre_setting(pre)
        flags = dict(add_space_prefix=False, clean_spaces=setting.clean_spaces,
                     escape_whitespaces=setting.escape_whitespaces,
                     ignore_merges=setting.ignore_merges, add_bos=setting.add_bos, add_eos=False)
        if setting.no_bos:
            special["bos"] = None
    else:
        flags = dict(add_space_prefix=True, clean_spaces=False, escape_whitespaces=True,
                     ignore_merges=False, add_bos=True, add_eos=False)
    for name, key in FLAG_KEYS:
        value = _get(meta, types, key)
        if value is not None and name in flags:
            flags[name] = value
    if setting is not None and setting.force_add_bos:
        flags["add_bos"] = True

    texts = list(_required(meta, types, "tokenizer.ggml.tokens"))
    n = len(texts)
    if n == 0:
        raise GGUFError("tokenizer.ggml.tokens is empty: a vocabulary needs at least one token")
    scores = _per_token(meta, types, "tokenizer.ggml.scores", n, 0.0)
    token_types = _per_token(meta, types, "tokenizer.ggml.token_type", n, 1)
    token_to_id: dict[str, int] = {}
    for i, text in enumerate(texts):
        if not text:
            text = texts[i] = f"[EMPTY_{i}]"
        if text in token_to_id:  # llama.cpp aborts on this (one id per text)
            raise GGUFError(f"tokenizer.ggml.tokens: token {i} {text!r} duplicates token "
                            f"{token_to_id[text]}")
        token_to_id[text] = i
    attrs = [TOKEN_TYPE_ATTR.get(t, Attr.UNDEFINED) for t in token_types]
    _check_byte_tokens(kind, texts, attrs, token_to_id)

    ranks: dict[str, int] = {}
    if kind == "bpe":
        merges = _get(meta, types, "tokenizer.ggml.merges")
        if merges is None and pre != "kimi-k2":
            raise GGUFError("missing metadata key tokenizer.ggml.merges (needed by a BPE vocabulary)")
        # llama.cpp splits a rule at its first space after position 0 and keeps the first
        # rank of a pair; since symbols never contain spaces, keying by the rule text is
        # the same (a rule with no such space, or with two, can never apply).
        for rank, rule in enumerate(merges or ()):
            ranks.setdefault(rule, rank)

    for slot, key in SPECIAL_ID_KEYS:
        if special[slot] is not None and special[slot] >= n:
            special[slot] = None  # a default out of range is disabled
        new_id = _get(meta, types, key)
        if new_id is None:
            continue
        if new_id >= n:
            warnings.warn(f"{key} = {new_id} is outside the vocabulary ({n} tokens); "
                          f"keeping {special[slot]}", stacklevel=3)
        else:
            special[slot] = new_id

    vocab = Vocab(model=model, kind=kind, pre=pre, setting=setting, texts=texts, scores=scores,
                  attrs=attrs, token_to_id=token_to_id, ranks=ranks, special=special, **flags)
    _detect_special(vocab)
    vocab.special_order = tuple(sorted(
        (i for i, a in enumerate(vocab.attrs) if a & SPECIAL_ATTRS),
        key=lambda i: -len(vocab.texts[i].encode())))
    _model_specific_attrs(vocab, meta, types)
    return vocab


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _check_byte_tokens(kind: str, texts: list[str], attrs: list[int], token_to_id: dict[str, int]) -> None:
    """Refuse at load what would fail at encode/decode time.

    * A BYTE token's text must be ``<0xHH>``: its piece is that byte. (llama.cpp reads
      ``strtol(text.substr(3, 2), 16)``: it throws at load on a text shorter than 3 bytes and
      decodes any other malformed text to some byte; gguflm refuses both.)
    * SPM byte fallback spells a piece that is no token as byte tokens, ``<0xHH>`` or, for
      ASCII, the byte itself as a token (llama.cpp's ``byte_to_token``). A vocabulary that
      cannot spell every byte is refused (llama.cpp loads it and throws ``out_of_range``
      when it first meets such a byte while tokenizing).
    """
    for i, text in enumerate(texts):
        if attrs[i] & Attr.BYTE and not BYTE_TOKEN.fullmatch(text):
            raise GGUFError(f"token {i} {text[:40]!r} has type BYTE but its text is not of the form <0xHH>")
    if kind == "spm":
        for b in range(256):
            if f"<0x{b:02X}>" not in token_to_id and not (b < 0x80 and chr(b) in token_to_id):
                raise GGUFError(f"SPM vocabulary without a token for byte 0x{b:02X} (<0x{b:02X}>): "
                                "byte fallback could not spell every text")


def _pre_setting(pre: str) -> PreSetting:
    if not pre:
        warnings.warn("GGUF has no tokenizer.ggml.pre: using the 'default' BPE pre-tokenizer, "
                      "as llama.cpp does (tokenization quality will be degraded)", stacklevel=4)
        return PRE_SETTINGS["default"]
    if pre not in PRE_SETTINGS:
        raise GGUFError(f"unknown pre-tokenizer type tokenizer.ggml.pre = {pre!r} (llama.cpp "
                        f"refuses it too); known: {', '.join(sorted(PRE_SETTINGS))}")
    return PRE_SETTINGS[pre]


def _per_token(meta, types, key: str, n: int, default):
    values = _get(meta, types, key)
    if values is None:
        return [default] * n
    if len(values) < n:
        raise GGUFError(f"{key} has {len(values)} entries for {n} tokens")
    return values[:n]


def _detect_special(v: Vocab) -> None:
    """EOT/EOM/FIM ids by text, unused tokens, end-of-generation set (llama.cpp's order)."""
    ids, attrs = v.token_to_id, v.attrs
    for slot, candidates in DETECTED.items():
        if v.special[slot] is not None:
            continue
        for text in candidates:
            if text in ids:
                v.special[slot] = ids[text]
                attrs[ids[text]] |= Attr.CONTROL
                break
    for i, text in enumerate(v.texts):
        if attrs[i] & Attr.CONTROL and "unused" in text:
            attrs[i] |= Attr.UNUSED

    eog = {v.special[s] for s in ("fim_pad", "fim_rep", "fim_sep") if v.special[s] is not None}
    for text in EOG_TEXTS:
        if text in ids:
            eog.add(ids[text])
            attrs[ids[text]] |= Attr.CONTROL
    for text in ALWAYS_RENDERED:
        if text in ids:
            attrs[ids[text]] = Attr.USER_DEFINED
    eog.update(v.special[s] for s in ("eos", "eot", "eom") if v.special[s] is not None)

    in_eog = {v.texts[i] for i in eog}
    has_call = "<|call|>" in in_eog or "<|calls|>" in in_eog
    if "<|end|>" in in_eog and has_call and ("<|return|>" in in_eog or "<|flush|>" in in_eog):
        end = ids["<|end|>"]  # o200k_harmony / solar-open: <|end|> does not end generation
        eog.discard(end)
        attrs[end] = Attr.USER_DEFINED
    if "</s>" in in_eog and ("<|tool_response>" in in_eog or "<|plamo:eos|>" in in_eog):
        s = ids["</s>"]  # gemma4 / plamo: </s> is an ordinary token there
        eog.discard(s)
        attrs[s] = Attr.NORMAL
    v.eog_ids = frozenset(eog)


def _model_specific_attrs(v: Vocab, meta, types) -> None:
    """lstrip/rstrip attributes llama.cpp sets by model name, pre-tokenizer or architecture."""
    name = (_get(meta, types, "general.name") or "").encode().lower().decode()
    pre = _get(meta, types, "tokenizer.ggml.pre") or ""
    arch = _get(meta, types, "general.architecture") or ""

    def need(text: str) -> int:
        if text not in v.token_to_id:
            raise GGUFError(f"vocabulary of a {name!r} model has no {text!r} token")
        return v.token_to_id[text]

    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
            any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
        if "<mask>" in v.token_to_id:
            v.attrs[v.token_to_id["<mask>"]] |= Attr.LSTRIP
    elif "phi-3" in name or "phi3" in name:
        for i in v.special_order:
            v.attrs[i] |= Attr.RSTRIP
        v.attrs[need("</s>")] |= Attr.RSTRIP
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            v.attrs[need(text)] &= ~Attr.RSTRIP
    elif "modern-bert" in name and "[MASK]" in v.token_to_id:
        v.attrs[v.token_to_id["[MASK]"]] |= Attr.LSTRIP
