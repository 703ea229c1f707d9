"""The oracle for the tokenizer tests: llama.cpp's own tokenizer, reached through
llama-cpp-python's low-level API on vocabulary-only loads (``vocab_only=True``).

``llama_tokenize`` is called with the same ``add_special``/``parse_special`` flags as
ours, and ``llama_detokenize`` directly (not ``Llama.detokenize``, which renders
pieces one by one into a 32-byte buffer, skips the clean-up of spaces and strips a
space after BOS on its own).
"""

from __future__ import annotations

import ctypes
from functools import cached_property
from pathlib import Path

import pytest

import gguflm
from gguflm.tokenizer.vocab import load_vocab

class LlamaVocab:
    """A vocabulary loaded by llama.cpp (vocab only)."""

    def __init__(self, path: Path):
        ll = self.ll = pytest.importorskip("llama_cpp", reason="llama.cpp is the oracle; install .[dev]")
        _silence(ll)
        params = ll.llama_model_default_params()
        params.vocab_only = True
        self.model = ll.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.path = path

    def __del__(self):
        if getattr(self, "model", None):
            self.ll.llama_model_free(self.model)

    @cached_property
    def n_vocab(self) -> int:
        return self.ll.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode()
        n = len(data) + 8
        while True:
            buf = (self.ll.llama_token * n)()
            got = self.ll.llama_tokenize(self.vocab, data, len(data), buf, n, add_special, parse_special)
            if got >= 0:
                return list(buf[:got])
            n = -got

    def detokenize(self, ids: list[int], remove_special: bool = False,
                   unparse_special: bool = False) -> bytes:
        arr = (self.ll.llama_token * max(1, len(ids)))(*ids)
        n = 16 + 4 * len(ids)
        while True:
            buf = ctypes.create_string_buffer(n)
            got = self.ll.llama_detokenize(self.vocab, arr, len(ids), buf, n, remove_special,
                                           unparse_special)
            if got >= 0:
                return buf.raw[:got]
            n = -got

    def piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(256)
        got = self.ll.llama_token_to_piece(self.vocab, token, buf, 256, 0, special)
        if got < 0:
            buf = ctypes.create_string_buffer(-got)
            got = self.ll.llama_token_to_piece(self.vocab, token, buf, -got, 0, special)
        return buf.raw[:got]

    def special_id(self, name: str) -> int | None:
        tid = getattr(self.ll, f"llama_vocab_{name}")(self.vocab)
        return None if tid < 0 else tid

    def is_eog(self, token: int) -> bool:
        return bool(self.ll.llama_vocab_is_eog(self.vocab, token))

    def is_control(self, token: int) -> bool:
        return bool(self.ll.llama_vocab_is_control(self.vocab, token))

    def attr(self, token: int) -> int:
        return int(self.ll.llama_vocab_get_attr(self.vocab, token))

    def text(self, token: int) -> str:
        return self.ll.llama_vocab_get_text(self.vocab, token).decode()

    @property
    def add_bos(self) -> bool:
        return bool(self.ll.llama_vocab_get_add_bos(self.vocab))

    @property
    def add_eos(self) -> bool:
        return bool(self.ll.llama_vocab_get_add_eos(self.vocab))


_LOG_CALLBACK = None


def _silence(ll) -> None:
    """Route llama.cpp's log lines to nowhere (once per process)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        @ll.llama_log_callback
        def _drop(level, text, user_data):  # pragma: no cover - called from C
            return None

        _LOG_CALLBACK = _drop
        ll.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())


@pytest.fixture(scope="session")
def vocab_path(request):
    """vocab_path(name) -> a vocabulary file: one of VOCABS (../shared/vocab, skipped when
    absent) or "smollm2" (the real model's file)."""

    def get(name: str) -> Path:
        if name == "smollm2":
            return request.getfixturevalue("smollm2_path")
        shared = request.getfixturevalue("shared_dir")
        p = shared / "vocab" / f"ggml-vocab-{name}.gguf"
        if not p.exists():
            pytest.skip(f"shared test data not found: {p}")
        return p

    return get


class Pair:
    """Our tokenizer and llama.cpp's for the same file, loaded once per session."""

    def __init__(self, path: Path, ours: gguflm.Tokenizer | None = None):
        self.path = path
        self.ours = ours or gguflm.Tokenizer.from_gguf(path)
        self.llama = LlamaVocab(path)


@pytest.fixture(scope="session")
def pair(vocab_path):
    """pair(name_or_path) -> Pair, cached for the session."""
    cache: dict[str, Pair] = {}

    def get(name: str | Path) -> Pair:
        key = str(name)
        if key not in cache:
            cache[key] = Pair(Path(name) if isinstance(name, Path) else vocab_path(name))
        return cache[key]

    return get


def write_gguf(path: Path, metadata: dict, types: dict) -> Path:
    """A vocabulary-only GGUF file holding ``metadata`` (typed as a GGUFFile reports it),
    written by the official gguf package."""
    gguf = pytest.importorskip("gguf")
    arch = metadata.get("general.architecture", "llama")
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        t = types[key]
        sub = gguf.GGUFValueType(int(t[1])) if len(t) > 1 else None
        w.add_key_value(key, value, gguf.GGUFValueType(int(t[0])), sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def variant(tmp_path_factory, vocab_path):
    """variant(base_name, **changes) -> Pair for a copy of a vocabulary with some metadata
    keys changed (``tokenizer__ggml__pre=(value, type)``; value None removes the key).
    Ours is built from the same metadata that is written; cached for the session."""
    cache: dict[tuple, Pair] = {}
    bases: dict[str, tuple[dict, dict]] = {}
    root = tmp_path_factory.mktemp("vocab-variants")

    def make(base: str, **changes) -> Pair:
        key = (base, tuple(sorted((k, repr(v)) for k, v in changes.items())))
        if key not in cache:
            if base not in bases:
                with gguflm.GGUFFile(vocab_path(base)) as f:
                    bases[base] = f.metadata, f.metadata_types
            meta, types = dict(bases[base][0]), dict(bases[base][1])
            for k, (value, vtype) in changes.items():
                k = k.replace("__", ".")
                if value is None:
                    meta.pop(k, None)
                else:
                    meta[k], types[k] = value, vtype
            path = write_gguf(root / f"{base}-{len(cache)}.gguf", meta, types)
            cache[key] = Pair(path, gguflm.Tokenizer(load_vocab(meta, types)))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def gguf_writer():
    """write_gguf(path, metadata, types) -> path (see write_gguf)."""
    return write_gguf


@pytest.fixture(scope="session")
def llama_loader():
    """LlamaVocab(path): llama.cpp's vocab-only load (RuntimeError when it refuses)."""
    return LlamaVocab
