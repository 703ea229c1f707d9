"""llama.cpp as an oracle, through llama-cpp-python: its tokenizer, its logits, and the
Jinja renderer llama-cpp-python uses for GGUF chat templates.

Every call runs llama.cpp's own C++ (``Llama(..., vocab_only=True)`` for the tokenizer,
``Llama(..., logits_all=True)`` for logits); nothing here reimplements it. llama.cpp logs
on file descriptor 2; the calls below send that to a temporary file and attach its tail
to the error if a call fails, so a report's progress bar stays readable.

Import-safe without llama-cpp-python: :func:`available` says False and every other
function raises :class:`OracleUnavailable` (from :mod:`.ggml_oracle`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from gguflm.verify.ggml_oracle import OracleUnavailable

__all__ = ["available", "version", "tokenize", "LlamaCppModel", "render_chat_template", "OracleUnavailable"]


def available() -> bool:
    """True when llama-cpp-python is installed (it is imported lazily, on first use)."""
    return importlib.util.find_spec("llama_cpp") is not None


@functools.cache
def _llama_cpp() -> Any:
    if not available():
        raise OracleUnavailable("llama-cpp-python is not installed (pip install llama-cpp-python)")
    import llama_cpp

    return llama_cpp


def version() -> str:
    """llama-cpp-python's version string."""
    return str(_llama_cpp().__version__)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Redirect file descriptor 2 (llama.cpp's log) to a temporary file for the block;
    on an exception, the last lines of that log are added to the exception's notes."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except Exception as e:
            os.dup2(saved, 2)
            log.seek(0)
            tail = log.read()[-2000:].decode("utf-8", "replace").strip()
            if tail:
                e.add_note(f"llama.cpp log:\n{tail}")
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@functools.lru_cache(maxsize=4)
def _vocab(path: str) -> Any:
    with _quiet():
        return _llama_cpp().Llama(path, vocab_only=True, verbose=False)


def tokenize(path: str | os.PathLike, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
    """llama.cpp's ``llama_tokenize`` of ``text`` with the vocabulary of the GGUF at ``path``."""
    vocab = _vocab(str(path))
    with _quiet():
        return [int(t) for t in vocab.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)]


class LlamaCppModel:
    """A llama.cpp context over a GGUF file that returns the logits of every position.

    ``n_ctx`` bounds the longest sequence :meth:`logits` accepts; ``n_threads`` defaults
    to every core.
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int, n_threads: int | None = None):
        self.path, self.n_ctx = str(path), int(n_ctx)
        threads = n_threads or os.cpu_count() or 1
        with _quiet():
            self._llm = _llama_cpp().Llama(self.path, n_ctx=self.n_ctx, n_batch=min(self.n_ctx, 512),
                                           logits_all=True, n_threads=threads, n_threads_batch=threads,
                                           verbose=False)

    @property
    def n_vocab(self) -> int:
        return int(self._llm.n_vocab())

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Float32 [len(ids), n_vocab]: llama.cpp's logits after each token, from an empty cache."""
        ids = [int(t) for t in ids]
        if not 0 < len(ids) <= self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}")
        with _quiet():
            self._llm.reset()
            self._llm.eval(ids)
        return np.array(self._llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def close(self) -> None:
        """Free llama.cpp's model and context now (rather than at garbage collection)."""
        with _quiet():
            self._llm.close()


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], bos_token: str, eos_token: str,
                         add_generation_prompt: bool = True) -> str:
    """The prompt llama-cpp-python's ``Jinja2ChatFormatter`` renders from ``template`` (its
    Jinja configuration follows transformers': sandboxed, trim_blocks, lstrip_blocks)."""
    _llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token,
                              add_generation_prompt=add_generation_prompt)
    return str(fmt(messages=[dict(m) for m in messages]).prompt)
