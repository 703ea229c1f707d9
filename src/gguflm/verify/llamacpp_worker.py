"""The child process that runs llama.cpp for :mod:`gguflm.verify.llamacpp`.

llama.cpp is C++ that can crash (a native build's AMX matmul on Intel Sapphire Rapids,
llama.cpp #20824, is a SIGSEGV) or hang; run here, in its own process, it cannot take
gguflm down. Started as ``python -m gguflm.verify.llamacpp_worker``; it reads requests on
stdin and answers on stdout, both as frames::

    u64 little-endian length, then a pickle of the message

request ``(op, *args)``; answer ``("ok", value)`` or ``("error", message)`` for a Python
exception (a crash answers nothing: the parent sees the pipe close and the exit status).
Ops: ``version``, ``tokenize``, ``render``, ``load``, ``logits``, ``unload``. Both ends are
gguflm's own code, so pickle is trusted here. llama.cpp's log goes to stderr, which the
parent points at a file; the original stdout is kept for the frames alone.

The child exits when its stdin closes and, on Linux, when its parent dies
(``PR_SET_PDEATHSIG``), so it is never left behind. It ignores SIGINT: Ctrl-C is the
parent's to handle.

``GGUFLM_TEST_LLAMACPP_CRASH=KIND[@OP]`` (tests only) makes op OP (default ``logits``)
crash before answering: ``segv`` (SIGSEGV), ``exit`` (status 3) or ``hang`` (sleeps).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import struct
import sys
import time
from typing import Any, BinaryIO

CRASH_ENV = "GGUFLM_TEST_LLAMACPP_CRASH"
PARENT_ENV = "GGUFLM_LLAMACPP_PARENT"
_HEAD = struct.Struct("<Q")
PR_SET_PDEATHSIG = 1
OPS = ("version", "tokenize", "render", "load", "logits", "unload")


def write_frame(out: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEAD.pack(len(data)))
    out.write(data)
    out.flush()


def _read_exact(inp: BinaryIO, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = inp.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(inp: BinaryIO) -> Any:
    """The next message, or None at end of input."""
    head = _read_exact(inp, _HEAD.size)
    if head is None:
        return None
    data = _read_exact(inp, _HEAD.unpack(head)[0])
    return None if data is None else pickle.loads(data)


def open_llama(path: str | os.PathLike, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(path, **kwargs)`` with ``use_extra_bufts = False`` in its model
    parameters: no repacked or AMX weight buffers, even in a native build. (``Llama`` takes
    its model parameters from ``llama_model_default_params`` and has no argument for
    this one, so that function is wrapped while the model loads.)"""
    import llama_cpp
    from llama_cpp import llama_cpp as capi

    default = capi.llama_model_default_params

    def params() -> Any:
        p = default()
        if "use_extra_bufts" in dict(p._fields_):
            p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        capi.llama_model_default_params = default


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits; exit now if it already has."""
    parent = os.environ.get(PARENT_ENV)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if parent and os.getppid() != int(parent):
        os._exit(0)


def _maybe_crash(op: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    kind, _, at = spec.partition("@")
    if op != (at or "logits"):
        return
    sys.stderr.write(f"{CRASH_ENV}={spec}: {kind} in {op}\n")
    sys.stderr.flush()
    if kind == "segv":
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "exit":
        os._exit(3)
    elif kind == "hang":
        while True:
            time.sleep(3600)


class _Oracle:
    """The state one child keeps: vocabularies by path and at most one model."""

    def __init__(self) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.vocabs: dict[str, Any] = {}
        self.llm: Any = None
        self.n_ctx = 0

    def version(self) -> str:
        return str(self.llama_cpp.__version__)

    def tokenize(self, path: str, text: str, add_special: bool, parse_special: bool) -> list[int]:
        if path not in self.vocabs:
            self.vocabs[path] = self.llama_cpp.Llama(path, vocab_only=True, verbose=False)
        return [int(t) for t in self.vocabs[path].tokenize(text.encode("utf-8"), add_bos=add_special,
                                                          special=parse_special)]

    def render(self, template: str, messages: list[dict], bos_token: str, eos_token: str,
               add_generation_prompt: bool) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fmt = Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token,
                                  add_generation_prompt=add_generation_prompt)
        return str(fmt(messages=messages).prompt)

    def load(self, path: str, n_ctx: int, n_threads: int) -> int:
        self.unload()
        self.llm = open_llama(path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, n_threads=n_threads,
                              n_threads_batch=n_threads, verbose=False)
        self.n_ctx = n_ctx
        return int(self.llm.n_vocab())

    def logits(self, ids: list[int]) -> Any:
        import numpy as np

        if self.llm is None:
            raise RuntimeError("no model loaded")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32, copy=True)    # [T, V]

    def unload(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def main() -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the frames get the original stdout; anything llama.cpp prints goes to the log (fd 2)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    oracle: _Oracle | None = None
    while True:
        msg = read_frame(inp)
        if msg is None:
            return 0
        op, *args = msg
        try:
            if op not in OPS:
                raise ValueError(f"unknown op {op!r}")
            _maybe_crash(op)
            if oracle is None:
                oracle = _Oracle()
            answer = ("ok", getattr(oracle, op)(*args))
        except Exception as e:  # a Python-level failure is an answer; the parent raises it
            answer = ("error", f"{type(e).__name__}: {e}")
        write_frame(out, answer)


if __name__ == "__main__":
    sys.exit(main())
