"""Oracles for the chat tests.

- ``hf_render``: transformers' own ``apply_chat_template(..., tokenize=False)`` on a real
  ``PreTrainedTokenizerFast`` (a two-token word-level tokenizer: the rendering path does not
  depend on the vocabulary, only on the template and the special tokens).
- ``llama_apply``: llama.cpp's ``llama_chat_apply_template`` (format detection + its built-in
  formatters), through llama-cpp-python's bundled library.
- ``llama_vocab_facts``: what llama.cpp reads from a GGUF: its chat template and the pieces of
  its BOS/EOS tokens.
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def llama_cpp_module() -> Any:
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is the oracle; install .[dev]")


@pytest.fixture(scope="session")
def hf_render() -> Callable[..., str]:
    """hf_render(source, messages, bos_token=..., eos_token=..., **kwargs) -> str (or raises)."""
    pytest.importorskip("transformers", reason="transformers is the rendering oracle; install .[dev]")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokenizers: dict[tuple[str, str], Any] = {}

    def render(source: str, messages: list[dict], bos_token: str = "<s>", eos_token: str = "</s>",
               **kwargs: Any) -> str:
        key = (bos_token, eos_token)
        if key not in tokenizers:
            vocab = Tokenizer(WordLevel({bos_token: 0, eos_token: 1}, unk_token=bos_token))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tokenizers[key] = PreTrainedTokenizerFast(tokenizer_object=vocab, bos_token=bos_token,
                                                          eos_token=eos_token)
        return tokenizers[key].apply_chat_template(messages, chat_template=source, tokenize=False, **kwargs)

    return render


@pytest.fixture(scope="session")
def llama_apply() -> Callable[[str, list[tuple[str, str]], bool], str | None]:
    """llama_apply(template_or_name, [(role, content)...], add_ass) -> text, None if llama.cpp
    does not recognize the template."""
    llama_cpp = llama_cpp_module()

    def apply(template: str, chat: list[tuple[str, str]], add_ass: bool) -> str | None:
        keep = [(role.encode(), content.encode()) for role, content in chat]
        messages = (llama_cpp.llama_chat_message * len(keep))()
        for i, (role, content) in enumerate(keep):
            messages[i].role, messages[i].content = role, content
        size = 1
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(template.encode(), messages, len(keep), add_ass, buf, size)
            if n < 0:
                return None
            if n <= size:
                return buf.raw[:n].decode()
            size = n

    return apply


@pytest.fixture(scope="session")
def llama_vocab_facts() -> Callable[[Path], dict[str, Any]]:
    """llama_vocab_facts(path) -> {"template": str|None, "bos": str, "eos": str} as llama.cpp's
    common code gets them (llama_model_chat_template; token_to_piece(special=True))."""
    llama_cpp = llama_cpp_module()

    def piece(vocab: Any, token: int) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, 256, 0, True)
        return buf.raw[:n].decode()

    def facts(path: Path) -> dict[str, Any]:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert model, f"llama.cpp could not load {path}"
        try:
            vocab = llama_cpp.llama_model_get_vocab(model)
            template = llama_cpp.llama_model_chat_template(model, None)
            return {"template": template.decode() if template is not None else None,
                    "bos": piece(vocab, llama_cpp.llama_vocab_bos(vocab)),
                    "eos": piece(vocab, llama_cpp.llama_vocab_eos(vocab))}
        finally:
            llama_cpp.llama_model_free(model)

    return facts
