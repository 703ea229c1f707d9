"""llama.cpp as an oracle, through llama-cpp-python: its tokenizer, its logits, and the
Jinja renderer llama-cpp-python uses for GGUF chat templates.

Every call runs llama.cpp's own C++ (``Llama(..., vocab_only=True)`` for the tokenizer,
``Llama(..., logits_all=True)`` for logits); nothing here reimplements it. It runs in a
child process (:mod:`.llamacpp_worker`), so llama.cpp crashing or hanging cannot take
gguflm down: :class:`LlamaCpp` raises :class:`OracleFailed` instead, saying what happened
and how to avoid it, and leaves no process behind. The model is loaded with
``use_extra_bufts = False`` (no repacked or AMX weight buffers). llama.cpp's log goes to a
temporary file; its tail is attached to an error.

Import-safe without llama-cpp-python (nothing here imports it): :func:`available` says
False and :class:`LlamaCpp` raises :class:`OracleUnavailable` (from :mod:`.ggml_oracle`),
whose message names the install command.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gguflm.verify.ggml_oracle import OracleUnavailable
from gguflm.verify.llamacpp_worker import _HEAD, PARENT_ENV

__all__ = ["available", "version", "LlamaCpp", "LlamaCppModel", "OracleFailed", "OracleUnavailable",
           "INSTALL_HINT", "TIMEOUT_ENV"]

SPEC = "llama-cpp-python==0.3.36"
# tools/install_llama_cpp.sh's flags: x86-64-v3, no AVX-512 and no AMX
PORTABLE_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
                       "-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
_PIP = f"CMAKE_ARGS='{PORTABLE_CMAKE_ARGS}' pip install --no-cache-dir {SPEC}"
INSTALL_HINT = f"install it built portably: {_PIP} (or `make install-dev` in a gguflm checkout)"
REINSTALL_HINT = (f"reinstall llama-cpp-python built portably: {_PIP.replace('pip install', 'pip install --force-reinstall')}"
                  " (or `make install-dev` in a gguflm checkout)")
CRASH_HINT = ("llama.cpp's native build crashes on some CPUs (its AMX matmul on Intel Sapphire Rapids, "
              f"llama.cpp #20824): {REINSTALL_HINT}")
TIMEOUT_ENV = "GGUFLM_LLAMACPP_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0   # seconds for one request (loading a large model, a long sequence on few cores)


class OracleFailed(RuntimeError):
    """llama.cpp's process crashed, hung or failed a request. ``what`` says what happened
    (``"llama.cpp crashed with SIGSEGV (signal 11) while evaluating logits"``), ``hint``
    how to avoid it, ``log`` the tail of llama.cpp's log."""

    def __init__(self, what: str, hint: str = "", log: str = ""):
        super().__init__(what + (f"; {hint}" if hint else ""))
        self.what, self.hint, self.log = what, hint, log


def available() -> bool:
    """True when llama-cpp-python is installed (it is only ever imported in the child)."""
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    """llama-cpp-python's version string (from its package metadata)."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


_DOING = {"version": "starting", "tokenize": "tokenizing", "render": "rendering the chat template",
          "load": "loading the model", "logits": "evaluating logits", "unload": "freeing the model"}


class LlamaCpp:
    """llama-cpp-python in a child process; one request at a time.

    ``timeout`` bounds each request in seconds (default ``$GGUFLM_LLAMACPP_TIMEOUT`` or
    1800). After a crash or a timeout the child is gone and every later call raises the
    same :class:`OracleFailed`. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, timeout: float | None = None):
        if not available():
            raise OracleUnavailable(f"llama-cpp-python is not installed: {INSTALL_HINT}")
        self.timeout = float(timeout if timeout is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
        self.failed: OracleFailed | None = None
        self._log = tempfile.TemporaryFile()
        root = str(Path(__file__).resolve().parents[2])            # the folder holding this gguflm
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                   **{PARENT_ENV: str(os.getpid())})
        self.proc = subprocess.Popen([sys.executable, "-m", "gguflm.verify.llamacpp_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env, close_fds=True)
        self._finalizer = weakref.finalize(self, _kill, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child: end of input, then SIGKILL if it does not exit within 2 s (it
        may be busy with a request the caller gave up on, after Ctrl-C)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        _kill(self.proc)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
        self._finalizer.detach()
        self._log.close()

    def log_tail(self, n: int = 2000) -> str:
        if self._log.closed:
            return ""
        self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, self._log.tell() - n))
        return self._log.read().decode("utf-8", "replace").strip()

    # --- requests -------------------------------------------------------------------------

    def _call(self, op: str, *args: Any) -> Any:
        if self.failed is not None:
            raise self.failed
        doing = _DOING.get(op, op)
        data = pickle.dumps((op, *args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(_HEAD.pack(len(data)) + data)
            self.proc.stdin.flush()
            answer = self._read_answer(time.monotonic() + self.timeout)
        except (BrokenPipeError, EOFError):
            answer = None
        except TimeoutError:
            _kill(self.proc)
            self.failed = OracleFailed(f"llama.cpp did not answer within {self.timeout:.0f} s while {doing} "
                                       "(its process was stopped)",
                                       f"for a large model allow more time with {TIMEOUT_ENV}=SECONDS",
                                       self.log_tail())
            raise self.failed from None
        if answer is None:                                       # the child died
            try:
                rc = self.proc.wait(10)
            except subprocess.TimeoutExpired:
                _kill(self.proc)
                rc = self.proc.returncode
            if rc < 0:
                what = f"llama.cpp crashed with {_signal_name(-rc)} (signal {-rc}) while {doing}"
            else:
                what = f"llama.cpp's process exited with status {rc} while {doing}"
            self.failed = OracleFailed(what, CRASH_HINT, self.log_tail())
            raise self.failed
        status, value = answer
        if status == "error":
            raise OracleFailed(f"llama.cpp failed while {doing}: {value}", "", self.log_tail())
        return value

    def _read_answer(self, deadline: float) -> Any:
        """One frame from the child; None if its output ended; TimeoutError past ``deadline``."""
        fd = self.proc.stdout.fileno()

        def read(n: int) -> bytearray | None:
            buf = bytearray(n)                        # filled in place: logits can be ~1 GB
            view, got = memoryview(buf), 0
            while got < n:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
                k = os.readv(fd, [view[got:]])
                if not k:
                    return None
                got += k
            return buf

        head = read(_HEAD.size)
        if head is None:
            return None
        data = read(_HEAD.unpack(head)[0])
        return None if data is None else pickle.loads(data)

    def version(self) -> str:
        """The child's llama-cpp-python version."""
        return str(self._call("version"))

    def tokenize(self, path: str | os.PathLike, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        """llama.cpp's ``llama_tokenize`` of ``text`` with the vocabulary of the GGUF at ``path``."""
        return list(self._call("tokenize", str(path), text, bool(add_special), bool(parse_special)))

    def render_chat_template(self, template: str, messages: Sequence[Mapping[str, Any]], bos_token: str,
                             eos_token: str, add_generation_prompt: bool = True) -> str:
        """The prompt llama-cpp-python's ``Jinja2ChatFormatter`` renders from ``template`` (its
        Jinja configuration follows transformers': sandboxed, trim_blocks, lstrip_blocks)."""
        return str(self._call("render", template, [dict(m) for m in messages], bos_token, eos_token,
                              bool(add_generation_prompt)))

    def load(self, path: str | os.PathLike, n_ctx: int, n_threads: int | None = None) -> int:
        """Load the GGUF at ``path`` for :meth:`logits` (replacing any model loaded before);
        ``n_ctx`` bounds the longest sequence; ``n_threads`` defaults to every core. Returns
        the vocabulary size."""
        threads = n_threads or os.cpu_count() or 1
        return int(self._call("load", str(path), int(n_ctx), int(threads)))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Float32 [len(ids), n_vocab]: llama.cpp's logits after each token, from an empty cache."""
        return self._call("logits", [int(t) for t in ids])


class LlamaCppModel:
    """A llama.cpp context over a GGUF file, in its own child process, that returns the
    logits of every position. ``n_ctx`` bounds the longest sequence :meth:`logits`
    accepts; ``n_threads`` defaults to every core."""

    def __init__(self, path: str | os.PathLike, n_ctx: int, n_threads: int | None = None,
                 timeout: float | None = None):
        self.path, self.n_ctx = str(path), int(n_ctx)
        self.oracle = LlamaCpp(timeout)
        try:
            self.n_vocab = self.oracle.load(self.path, self.n_ctx, n_threads)
        except BaseException:
            self.oracle.close()
            raise

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Float32 [len(ids), n_vocab]: llama.cpp's logits after each token, from an empty cache."""
        if not 0 < len(ids) <= self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}")
        return self.oracle.logits(ids)

    def close(self) -> None:
        """Free llama.cpp's model and stop its process."""
        self.oracle.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
