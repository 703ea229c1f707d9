"""Chat templates render in a worker process that can be killed.

The sandbox (:mod:`gguflm.chat.sandbox`) checks its deadline between operations, but one
operation can run for ages inside C while holding the GIL: comparing, sorting, hashing or
``in``-testing lists that share sub-lists (``{% set a1 = [a0, a0] %}`` forty times, then
``a40 == b40``: 2**40 comparisons), inserting colliding integers into a set. A thread cannot
interrupt that; a process can be killed. So :func:`render` sends the template source and
the (plain, already normalized) variables to a worker process and waits at most
``limits.timeout_s`` plus :data:`GRACE_S` for the text; past that the worker is killed
(SIGKILL) and a fresh one is started for the next render. Each worker's address space is
capped (``RLIMIT_AS``: ``limits.max_memory_bytes`` above what it holds after start-up), so a
template cannot take the machine's memory either.

Workers are started lazily (the first render of a process pays ~0.1 s), kept for further
renders, at most :data:`MAX_WORKERS` at a time (concurrent renders beyond that wait), and
exit by themselves when this process goes away (their stdin reaches EOF). A worker loads
only this module, the sandbox and Jinja, not the rest of gguflm (no torch, no numpy).

Wire format (both ways a 4-byte big-endian length, then the payload): to the worker a
pickle of ``(source, limits as a dict, now, variables)`` (trusted: this process wrote it);
from the worker a JSON object ``{"text": ...}`` or ``{"error": ...}`` — JSON, not pickle,
because the worker runs untrusted code and this process must not unpickle what it writes.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from gguflm.errors import TemplateError

MAX_WORKERS = 4              # renders running at once in one process; more wait for a worker
GRACE_S = 0.5                # beyond the template's own deadline: compiling, transfers, start-up
START_TIMEOUT_S = 30.0       # a worker that has not said it is ready by then is not coming

_HEADER = struct.Struct(">I")
_READY = b"gguflm-template-worker-ready\n"

# Run with ``python -c BOOT <package dir>``: import the sandbox without gguflm's and
# gguflm.chat's __init__ (which pull in numpy and the GGUF reader), then serve.
_BOOT = """\
import sys, types
root = sys.argv[1]
for name, path in (("gguflm", root), ("gguflm.chat", root + "/chat")):
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
from gguflm.chat.worker import main
main()
"""


# -- the worker side ------------------------------------------------------------------------

def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main() -> None:
    """The worker's loop: read a request from stdin, render it, answer on stdout, until EOF."""
    import resource

    from gguflm.chat.sandbox import TemplateLimits, compile_template, render

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; we end at EOF
    fd_in, fd_out = sys.stdin.fileno(), os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints cannot corrupt the replies
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")  # what start-up took
    compiled: dict[tuple[str, TemplateLimits], Any] = {}
    _write_all(fd_out, _READY)
    while True:
        header = _read_exact(fd_in, _HEADER.size)
        if header is None:
            return
        payload = _read_exact(fd_in, _HEADER.unpack(header)[0])
        if payload is None:
            return
        try:
            source, limits, now, variables = pickle.loads(payload)
            limits = TemplateLimits(**limits)
            resource.setrlimit(resource.RLIMIT_AS, (vm + limits.max_memory_bytes, resource.RLIM_INFINITY))
            template = compiled.get((source, limits))
            if template is None:
                if len(compiled) >= 8:
                    compiled.pop(next(iter(compiled)))
                template = compiled[(source, limits)] = compile_template(source, limits)
            reply: dict[str, str] = {"text": render(template, variables, limits, now=now)}
        except TemplateError as e:
            reply = {"error": str(e)}
        except MemoryError:
            reply = {"error": f"chat template rendering exceeded {limits.max_memory_bytes >> 20} MB of memory"}
        del payload
        variables = None
        data = json.dumps(reply).encode()
        _write_all(fd_out, _HEADER.pack(len(data)) + data)


# -- this process's side --------------------------------------------------------------------

class _Worker:
    """One worker process and the pipes to it."""

    def __init__(self) -> None:
        package = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(package)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        try:
            ready = self._read(len(_READY), time.monotonic() + START_TIMEOUT_S)
        except TemplateError:
            self.kill()
            raise
        if ready != _READY:
            self.kill()
            raise TemplateError(f"the chat template worker did not start ({ready!r:.200})")

    def send(self, payload: bytes) -> None:
        """Send one request (OSError if the worker is gone)."""
        _write_all(self._in, _HEADER.pack(len(payload)) + payload)

    def reply(self, timeout: float, max_bytes: int) -> dict[str, str]:
        """The reply to the request sent, or TemplateError when it does not come in time."""
        deadline = time.monotonic() + timeout
        (n,) = _HEADER.unpack(self._read(_HEADER.size, deadline))
        if n > max_bytes:  # more than any prompt or message takes: not a reply of ours
            raise TemplateError(f"the chat template worker sent {n} bytes, more than any reply takes")
        reply = json.loads(self._read(n, deadline))
        if not isinstance(reply, dict):
            raise TemplateError("the chat template worker answered nonsense")
        return reply

    def _read(self, n: int, deadline: float) -> bytes:
        chunks, left = [], n
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([self._out], [], [], wait)[0]:
                raise _Timeout
            chunk = os.read(self._out, min(left, 1 << 20))
            if not chunk:
                raise _Died(self.proc.wait())
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class _Timeout(TemplateError):
    pass


class _Died(TemplateError):
    def __init__(self, returncode: int):
        super().__init__(f"the chat template worker died (exit status {returncode})")
        self.returncode = returncode


class _Pool:
    """Idle workers, and how many exist; a render takes one for itself."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._count = 0

    def take(self) -> _Worker:
        with self._cond:
            while not self._idle and self._count >= MAX_WORKERS:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._count += 1
        try:
            return _Worker()
        except BaseException:
            self._gone()
            raise

    def give_back(self, worker: _Worker) -> None:
        with self._cond:
            self._idle.append(worker)
            self._cond.notify()

    def discard(self, worker: _Worker) -> None:
        worker.kill()
        self._gone()

    def _gone(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify()

    def close(self) -> None:
        """Stop the idle workers (busy ones end with their render's owner)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for worker in idle:
            worker.proc.stdin.close()  # EOF: the worker returns from main()
            try:
                worker.proc.wait(2)
            except subprocess.TimeoutExpired:
                worker.kill()
            worker.proc.stdout.close()


_POOL = _Pool()


def _after_fork() -> None:  # a forked child must not share its parent's workers
    global _POOL
    _POOL = _Pool()


def prestart() -> None:
    """Start a worker now (a server does, so its first chat request does not wait ~0.1-0.3 s)."""
    pool = _POOL
    pool.give_back(pool.take())


def shutdown() -> None:
    """Stop this process's idle workers (they are started again when needed)."""
    _POOL.close()


os.register_at_fork(after_in_child=_after_fork)
atexit.register(shutdown)


def render(source: str, variables: dict[str, Any], limits: Any) -> str:
    """Render ``source`` (compiled in the worker, cached there) with plain ``variables`` within
    ``limits`` (a :class:`~gguflm.chat.sandbox.TemplateLimits`); TemplateError on any failure,
    including a render that exceeds the time or memory bound (the worker is then killed)."""
    from gguflm.chat import sandbox

    now = sandbox.datetime.now()  # the sandbox's clock (tests freeze it), as a plain datetime
    now = datetime(now.year, now.month, now.day, now.hour, now.minute, now.second, now.microsecond)
    payload = pickle.dumps((source, dataclasses.asdict(limits), now, variables), protocol=pickle.HIGHEST_PROTOCOL)
    pool = _POOL
    worker = pool.take()
    try:
        worker.send(payload)
    except OSError:  # it died while idle (killed from outside): once more with a fresh one
        pool.discard(worker)
        worker = pool.take()
        try:
            worker.send(payload)
        except OSError:
            pool.discard(worker)
            raise TemplateError("the chat template worker cannot be reached") from None
    # JSON writes each character in at most 12 bytes (a non-BMP one as two \uXXXX)
    max_reply = 12 * max(limits.max_output_chars, limits.max_string_chars) + 4096
    try:
        reply = worker.reply(limits.timeout_s + GRACE_S, max_reply)
    except _Timeout:
        pool.discard(worker)
        raise TemplateError(f"chat template rendering exceeded {limits.timeout_s} s; "
                            "the render was stopped") from None
    except _Died as e:
        pool.discard(worker)
        raise TemplateError(f"chat template rendering failed (time limit {limits.timeout_s} s, memory "
                            f"limit {limits.max_memory_bytes >> 20} MB): the render process "
                            + (f"was killed by signal {-e.returncode}" if e.returncode < 0
                               else f"exited with status {e.returncode}")) from None
    except BaseException:
        pool.discard(worker)
        raise
    pool.give_back(worker)
    if "error" in reply:
        raise TemplateError(str(reply["error"]))
    text = reply.get("text")
    if not isinstance(text, str):
        raise TemplateError("the chat template worker answered nonsense")
    return text
