"""An OpenAI-compatible HTTP server with continuous batching, and a chat page.

Follow a request: :mod:`app` (routes, errors, streaming) -> :mod:`schemas` (the body,
validated) -> :mod:`backend` (chat template, tokenizer, context check, submit) ->
:class:`gguflm.engine.scheduler.Scheduler` (the worker thread batching every running
request into one forward per step) -> :mod:`formats` (OpenAI response objects).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from gguflm.server.app import DEFAULT_MAX_BODY, create_app
from gguflm.server.backend import Backend

__all__ = ["create_app", "Backend", "serve", "CPU_BATCH_ROWS"]

# Decode rows per forward on the CPU. A step decodes each weight row once for all its rows
# (gguflm.quant.cpu's panel kernels), so wider steps keep paying until the float32 FMAs
# dominate: SmolLM2 Q4_1 on 2 cores, 150 tok/s at 1 row, 410 at 16, 470 at 32, 545 at 64,
# ~560 at 96-128 (benchmarks/results/2026-11-27-cpu-server.json). Past the cap, ready rows
# wait for further forwards of the same step, which a wider forward would serve sooner.
CPU_BATCH_ROWS = 64
SWITCH_INTERVAL = 0.0005  # seconds (sys.setswitchinterval) in a serving process


def serve(path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080, device: str = "cpu",
          parallel: int = 4, n_ctx: int | None = None, threads: int | None = None,
          max_body: int = DEFAULT_MAX_BODY, log_level: str = "info", batch_rows: int | None = None) -> None:
    """Load the model at ``path`` and serve it until interrupted. Each of the ``parallel``
    slots holds a whole context of ``n_ctx`` tokens (default: the model's default);
    ``batch_rows`` caps the rows of one decode forward (default: CPU_BATCH_ROWS on the
    CPU, all of them elsewhere)."""
    import uvicorn

    import gguflm
    from gguflm.engine.scheduler import Scheduler

    # The model loop and the event loop hand the GIL to each other at every step; a
    # shorter switch interval than Python's 5 ms keeps either from waiting on the other.
    sys.setswitchinterval(SWITCH_INTERVAL)
    model = gguflm.load(path, device=device, n_ctx=n_ctx, threads=threads)
    if batch_rows is None and model.device.type == "cpu":
        batch_rows = CPU_BATCH_ROWS
    # The model runs on this (main) thread, the one that loaded it, and HTTP on another:
    # see Scheduler's docstring on OpenMP teams.
    scheduler = Scheduler(model, parallel, max_batch_rows=batch_rows, start=False)
    app = create_app(Backend(model, scheduler), max_body=max_body)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))

    ended: list[BaseException] = []

    def http() -> None:
        try:
            server.run()
        except BaseException as e:  # uvicorn exits (SystemExit) when it cannot listen
            ended.append(e)
        finally:  # the server stopped (shut down, or it could not start): so does the loop
            scheduler.close()

    print(f"gguflm serve: {model!r}, {parallel} slots of {scheduler.n_ctx} tokens; "
          f"chat page and API at http://{host}:{port}/", file=sys.stderr, flush=True)
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
    if not server.started:
        raise OSError(f"could not serve on {host}:{port} (see the log above)") from (ended[0] if ended else None)
