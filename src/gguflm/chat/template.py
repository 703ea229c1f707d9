"""ChatTemplate: turn a conversation into the prompt text a model was trained on.

``render`` produces exactly what transformers'
``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` produces for the same
template, bos/eos tokens and arguments: the inputs are normalized the same way (message
objects to dicts, ``None``-valued keys dropped, everything rebuilt from plain JSON types,
reasoning aliased as ``thinking``/``reasoning_content``) and the template runs in the same
Jinja configuration, inside :mod:`gguflm.chat.sandbox`'s bounds, in a worker process
(:mod:`gguflm.chat.worker`) that is killed when a render exceeds its time or memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gguflm.chat.formats import BUILTIN_TEMPLATES, LLAMA_CPP_FORMATS, fallback_format
from gguflm.chat import worker
from gguflm.chat.sandbox import DEFAULT_LIMITS, TemplateLimits, compile_template
from gguflm.errors import GGUFError, TemplateError
from gguflm.gguf.reader import GGUFFile

log = logging.getLogger(__name__)

TEMPLATE_KEY = "tokenizer.chat_template"
TOOL_USE_KEY = "tokenizer.chat_template.tool_use"

# Where a message's reasoning may come in; the first is the name templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any) -> Any:
    """Rebuild a value from plain JSON types (str, int, float, bool, None, dict, list, tuple);
    anything else becomes an inert ``"<TypeName>"``. Templates then never see an object with
    methods of its own (transformers does the same)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, np.generic):  # numpy scalars: np.bool_(False) must stay falsy
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models (OpenAI SDK messages)
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _message(raw: Any) -> dict[str, Any]:
    """One message as the template sees it: a plain dict without ``None`` values, with its
    reasoning (under any of :data:`_REASONING_FIELDS`) also under ``thinking`` (first) and
    ``reasoning_content``."""
    message = _plain(raw)
    if not isinstance(message, dict):
        raise TemplateError(f"a chat message must be a dict with 'role' and 'content', not {message!r:.80}")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _dicts(items: Any, what: str) -> list[dict[str, Any]] | None:
    if items is None:
        return None
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise TemplateError(f"{what} must be a list of dicts")
    plain = [_plain(item) for item in items]
    for item in plain:
        if not isinstance(item, dict):
            raise TemplateError(f"{what} must be a list of dicts (JSON schemas), got {item!r:.80}")
    return plain


class ChatTemplate:
    """A compiled chat template with its BOS/EOS token texts.

    >>> tpl = ChatTemplate.builtin("chatml")
    >>> tpl.render([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", *,
                 limits: TemplateLimits = DEFAULT_LIMITS, origin: str = "given source"):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.limits = limits
        self.origin = origin
        self._template = compile_template(source, limits)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.origin}, {len(self.source)} chars, bos={self.bos_token!r}, eos={self.eos_token!r})"

    def render(self, messages: Sequence[Any], add_generation_prompt: bool = True, tools: Any = None,
               documents: Any = None, **extra: Any) -> str:
        """The prompt for ``messages``: what transformers' ``apply_chat_template(messages,
        tokenize=False, add_generation_prompt=..., tools=..., documents=..., **extra)`` renders.

        ``extra`` reaches the template as variables (e.g. ``enable_thinking=False``) and may
        override ``bos_token``/``eos_token``. Raises TemplateError for bad input, for an error
        the template raises (its message unchanged), and when a resource bound is hit.
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TemplateError("messages must be a list of dicts with 'role' and 'content'")
        if not messages:
            raise TemplateError("cannot render an empty conversation")
        try:
            variables = {
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                **{k: _plain(v) for k, v in extra.items()},
                "messages": [_message(m) for m in messages],
                "tools": _dicts(tools, "tools"),
                "documents": _dicts(documents, "documents"),
                "add_generation_prompt": bool(add_generation_prompt),
            }
        except RecursionError:
            raise TemplateError("chat messages are nested too deeply") from None
        return worker.render(self.source, variables, self.limits)

    @classmethod
    def builtin(cls, name: str, bos_token: str = "", eos_token: str = "", *,
                limits: TemplateLimits = DEFAULT_LIMITS) -> ChatTemplate:
        """One of our own templates for llama.cpp's format ``name`` (see BUILTIN_TEMPLATES)."""
        try:
            source = BUILTIN_TEMPLATES[name]
        except KeyError:
            known = ", ".join(sorted(BUILTIN_TEMPLATES))
            why = "llama.cpp knows it but gguflm has no template for it" if name in LLAMA_CPP_FORMATS \
                else "unknown format"
            raise TemplateError(f"no built-in chat format {name!r} ({why}); built-in: {known}") from None
        return cls(source, bos_token, eos_token, limits=limits, origin=f"built-in {name!r}")

    @classmethod
    def from_gguf(cls, source: str | os.PathLike | GGUFFile, *,
                  limits: TemplateLimits = DEFAULT_LIMITS) -> ChatTemplate:
        """The template of a GGUF file, with its vocabulary's BOS/EOS token texts.

        As llama.cpp: ``tokenizer.chat_template`` (a Jinja source, or a format name such as
        "chatml"), else ``tokenizer.chat_template.tool_use``. A file with neither gets a
        built-in format chosen by :data:`gguflm.chat.formats.FALLBACK_RULES` (llama.cpp would
        use chatml for all of them); the choice is logged as a warning (stderr by default).
        """
        if isinstance(source, GGUFFile):
            return cls._from_metadata(source.metadata, str(source.path), limits)
        with GGUFFile(source) as f:
            return cls._from_metadata(f.metadata, str(f.path), limits)

    @classmethod
    def _from_metadata(cls, md: Mapping[str, Any], where: str, limits: TemplateLimits) -> ChatTemplate:
        bos, eos = _token_text(md, "bos"), _token_text(md, "eos")
        for key in (TEMPLATE_KEY, TOOL_USE_KEY):
            text = md.get(key)
            if text is None:
                continue
            if not isinstance(text, str):
                raise TemplateError(f"{where}: {key} is a {type(text).__name__}, not a string")
            if text in BUILTIN_TEMPLATES:
                return cls.builtin(text, bos, eos, limits=limits)
            return cls(text, bos, eos, limits=limits, origin=f"{key} of {where}")
        name, why = fallback_format(md)
        log.warning("%s has no chat template; using the built-in %r format (%s)", where, name, why)
        return cls.builtin(name, bos, eos, limits=limits)


def _token_text(md: Mapping[str, Any], which: str) -> str:
    """The text of the vocabulary's BOS or EOS token; "" when the file names none."""
    key = f"tokenizer.ggml.{which}_token_id"
    token_id = md.get(key)
    if token_id is None:
        return ""
    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise GGUFError(f"{key} is set but tokenizer.ggml.tokens is missing")
    if type(token_id) is not int or not 0 <= token_id < len(tokens):
        raise GGUFError(f"{key} = {token_id!r} is not a token id (the vocabulary has {len(tokens)} tokens)")
    text = tokens[token_id]
    if not isinstance(text, str):
        raise GGUFError(f"tokenizer.ggml.tokens[{token_id}] is not a string")
    return text
