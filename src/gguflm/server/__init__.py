"""An OpenAI-compatible HTTP server with continuous batching, and a chat page.

Follow a request: :mod:`app` (routes, errors, streaming) -> :mod:`schemas` (the body,
validated) -> :mod:`backend` (chat template, tokenizer, context check, submit) ->
:class:`gguflm.engine.scheduler.Scheduler` (the worker thread batching every running
request into one forward per step) -> :mod:`gguflm.engine.formats` (OpenAI response objects).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
from collections.abc import Callable

from gguflm.server.app import DEFAULT_MAX_BODY, create_app
from gguflm.server.backend import Backend
from gguflm.server.security import DEFAULT_HEADER_TIMEOUT, Security, header_timeout_protocol

__all__ = ["create_app", "Backend", "Security", "serve", "CPU_BATCH_ROWS", "ModelFileChanged"]

# Decode rows per forward on the CPU. A step decodes each weight row once for all its rows
# (gguflm.quant.cpu's panel kernels), so wider steps keep paying until the float32 FMAs
# dominate: SmolLM2 Q4_1 on 2 cores, 150 tok/s at 1 row, 410 at 16, 470 at 32, 545 at 64,
# ~560 at 96-128 (benchmarks/results/2026-11-27-cpu-server.json). Past the cap, ready rows
# wait for further forwards of the same step, which a wider forward would serve sooner.
CPU_BATCH_ROWS = 64
SWITCH_INTERVAL = 0.0005  # seconds (sys.setswitchinterval) in a serving process
WATCH_INTERVAL = 1.0      # seconds between two looks at the model file


class ModelFileChanged(OSError):
    """The served model file was truncated or rewritten in place."""


class FileWatch:
    """Looks at the open model file every ``interval`` seconds (``fstat`` of a descriptor
    opened on it at start: renaming a new file over the path, the safe way to replace a
    model, leaves what was loaded, and this descriptor, untouched). A file truncated or
    rewritten in place under its memory mapping would crash the process with SIGBUS at the
    next read of a missing page; on the first change seen, ``on_change(message)`` runs once."""

    def __init__(self, path: str | os.PathLike, on_change: Callable[[str], None], interval: float = WATCH_INTERVAL):
        self.path, self.on_change, self.interval = os.fspath(path), on_change, interval
        self._fd = os.open(self.path, os.O_RDONLY)
        self._first = os.fstat(self._fd)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gguflm-file-watch", daemon=True)
        self._thread.start()

    def changed(self) -> str | None:
        """What changed since the start, or None."""
        now, was = os.fstat(self._fd), self._first
        if now.st_size != was.st_size:
            return f"its size went from {was.st_size} to {now.st_size} bytes"
        if now.st_mtime_ns != was.st_mtime_ns:  # (not ctime: a rename over the path changes that)
            return "it was modified in place"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            what = self.changed()
            if what is not None:
                self.on_change(f"the model file {self.path} changed on disk while being served ({what}); "
                               "stopping before reading from it crashes the process. To replace a model, "
                               "write the new file elsewhere, rename it over the old one, then restart")
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self._fd)


def serve(path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080, device: str = "cpu",
          parallel: int = 4, n_ctx: int | None = None, threads: int | None = None,
          max_body: int = DEFAULT_MAX_BODY, log_level: str = "info", batch_rows: int | None = None,
          security: Security | None = None, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
          tp: int = 1, kv_size: int | None = None, batch_invariant: bool = False) -> None:
    """Load the model at ``path`` and serve it until interrupted. Each of the ``parallel``
    slots holds a whole context of ``n_ctx`` tokens (default: the model's default);
    ``batch_rows`` caps the rows of one decode forward (default: CPU_BATCH_ROWS on the
    CPU, all of them elsewhere). ``security``: who may send requests (default: same-origin
    pages and clients that name this host, no API key; see :mod:`gguflm.server.security`);
    ``header_timeout``: seconds a connection may take to send a request's headers;
    ``tp``: tensor parallel over that many processes (this one serves HTTP and drives
    the others; under ``torchrun`` the other ranks follow inside ``serve`` and return).
    ``kv_size``: positions in the paged KV cache's block pool, shared by all requests
    (default: ``parallel`` whole contexts; no request holds more than it uses);
    ``batch_invariant``: the CPU kernels' batch-invariant mode (a request's logits are the
    same to the bit alone or among others; a lone request decodes slower, docs/server.md).
    Raises :class:`ModelFileChanged` when the model file is truncated or rewritten while
    served (see :class:`FileWatch`)."""
    import uvicorn  # noqa: F401  (the server extra, checked before the model loads)

    import gguflm

    # The model loop and the event loop hand the GIL to each other at every step; a
    # shorter switch interval than Python's 5 ms keeps either from waiting on the other.
    sys.setswitchinterval(SWITCH_INTERVAL)
    model = gguflm.load(path, device=device, n_ctx=n_ctx, threads=threads, tp=tp)
    if model is None:  # a rank other than 0 under torchrun: rank 0 has stopped serving
        return
    try:
        _serve(model, path, host, port, parallel, max_body, log_level, batch_rows, security, header_timeout,
               kv_size, batch_invariant)
    finally:
        model.close()


def _serve(model, path, host, port, parallel, max_body, log_level, batch_rows, security, header_timeout,
           kv_size=None, batch_invariant=False) -> None:
    import uvicorn

    # The model runs on this (main) thread, the one that loaded it, and HTTP on another:
    # see Scheduler's docstring on OpenMP teams.
    scheduler = make_scheduler(model, parallel, batch_rows, kv_size, batch_invariant)
    if security is None:
        security = Security(host)
    app = create_app(Backend(model, scheduler), max_body=max_body, security=security)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5,
                                           http=header_timeout_protocol(header_timeout)))
    # A fault (SIGBUS from a model file cut short under its mapping) leaves a traceback in
    # the log; a Python handler could not catch it (the faulting read would repeat forever).
    faulthandler.enable()
    changed: list[str] = []

    def stop_for(message: str) -> None:
        changed.append(message)
        print(f"gguflm serve: {message}", file=sys.stderr, flush=True)
        server.should_exit = True
        scheduler.close()

    watch = FileWatch(path, stop_for)
    from gguflm.chat import worker

    worker.prestart()  # the chat template's render process, started before the first request

    ended: list[BaseException] = []

    def http() -> None:
        try:
            server.run()
        except BaseException as e:  # uvicorn exits (SystemExit) when it cannot listen
            ended.append(e)
        finally:  # the server stopped (shut down, or it could not start): so does the loop
            scheduler.close()

    c = scheduler.cache
    pool = (f", KV cache {c.n_blocks} blocks of {c.block_size} positions" if c.paged else "")
    pool += ", batch invariant" if batch_invariant else ""
    print(f"gguflm serve: {model!r}, {parallel} slots of {scheduler.n_ctx} tokens{pool}; "
          f"chat page and API at http://{host}:{port}/", file=sys.stderr, flush=True)
    if security.api_key is None and not _loopback(host):
        print(f"gguflm serve: warning: listening on {host} without --api-key: anyone who can reach "
              "this port can use the model", file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    thread = threading.Thread(target=http, name="gguflm-http", daemon=True)
    thread.start()
    try:
        scheduler.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.should_exit = True
        scheduler.close()
        thread.join(10)
        watch.close()
    if changed:
        raise ModelFileChanged(changed[0])
    if not server.started:
        raise OSError(f"could not serve on {host}:{port} (see the log above)") from (ended[0] if ended else None)


def make_scheduler(model, parallel: int, batch_rows: int | None, kv_size: int | None, batch_invariant: bool):
    """The scheduler of :func:`serve` (and of a Ray replica), not started; see its arguments."""
    from gguflm.engine.scheduler import Scheduler
    from gguflm.model.kv_cache import DEFAULT_BLOCK_SIZE

    if batch_invariant and model.device.type == "cpu":
        model.model.set_batch_invariant(True)  # (every rank of a tensor-parallel model)
    if batch_rows is None and model.device.type == "cpu":
        batch_rows = CPU_BATCH_ROWS
    kv_blocks = None if kv_size is None else -(-kv_size // DEFAULT_BLOCK_SIZE)
    if kv_blocks is not None and hasattr(model.model, "use_paged_cache"):
        model.model.use_paged_cache(True)  # CUDA: --kv-size asks for the (opt-in) paged cache
    return Scheduler(model, parallel, max_batch_rows=batch_rows, start=False, kv_blocks=kv_blocks)


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"
