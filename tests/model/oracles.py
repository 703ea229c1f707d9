"""Helpers for asking the oracles: llama.cpp (through llama-cpp-python) for logits and
greedy continuations, and the KL/top-1 measures used to compare logit matrices."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Chat prompts whose greedy continuations the logit comparisons run along.
PROMPTS = [
    "Is Paris the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paper clip.",
]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) for each row, in float64."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def top1(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Fraction of rows whose argmax agrees."""
    return float((np.asarray(p_logits).argmax(-1) == np.asarray(q_logits).argmax(-1)).mean())


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp writes context notes to fd 2 even with verbose=False; keep test output readable."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def llama_cpp_model(llama_cpp, path: Path, n_ctx: int, f32_cache: bool = False):
    """A llama.cpp context on ``path``; ``f32_cache`` keeps keys/values in float32 (its
    default cache rounds them to float16). Loaded with ``use_extra_bufts = False``: no
    repacked or AMX weight buffers (AMX crashes a native build on some Intel CPUs)."""
    from gguflm.verify.llamacpp_worker import open_llama

    extra = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    with _quiet_stderr():
        return open_llama(path, logits_all=True, n_ctx=n_ctx, n_threads=2, n_batch=512, verbose=False, **extra)


def llama_cpp_logits(llama_cpp, path: Path, ids: Sequence[int], f32_cache: bool = False) -> np.ndarray:
    """llama.cpp's logits [len(ids), n_vocab] for ``ids`` evaluated from an empty context."""
    llm = llama_cpp_model(llama_cpp, path, n_ctx=max(64, len(ids)), f32_cache=f32_cache)
    with _quiet_stderr():
        llm.eval(list(ids))
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    return out


def llama_cpp_greedy(llama_cpp, path: Path, ids: Sequence[int], n: int, eog: set[int]) -> list[int]:
    """llama.cpp's greedy continuation of ``ids``: up to ``n`` tokens, stopping before an EOG id."""
    llm = llama_cpp_model(llama_cpp, path, n_ctx=len(ids) + n + 8)
    out: list[int] = []
    with _quiet_stderr():
        for tok in llm.generate(list(ids), temp=0.0, top_k=1, reset=True):
            if tok in eog or len(out) >= n:
                break
            out.append(tok)
    llm.close()
    return out
