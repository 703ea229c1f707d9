"""An OpenAI-compatible HTTP server with continuous batching, and a chat page.

Follow a request: :mod:`app` (routes, errors, streaming) -> :mod:`schemas` (the body,
validated) -> :mod:`backend` (chat template, tokenizer, context check, submit) ->
:class:`gguflm.engine.scheduler.Scheduler` (the worker thread batching every running
request into one forward per step) -> :mod:`formats` (OpenAI response objects).
"""

from __future__ import annotations

import os
import sys

from gguflm.server.app import DEFAULT_MAX_BODY, create_app
from gguflm.server.backend import Backend

__all__ = ["create_app", "Backend", "serve", "CPU_BATCH_ROWS"]

# Decode rows per forward on the CPU: the fused quantized decode step (gguflm.quant.cpu)
# covers up to 8 rows; past that a step falls back to dequantized tiles, and one 16-row
# step costs more than two 8-row ones (SmolLM2 on 2 cores: 16 concurrent requests took
# ~25% less CPU time in forwards of 8).
CPU_BATCH_ROWS = 8


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

    model = gguflm.load(path, device=device, n_ctx=n_ctx, threads=threads)
    if batch_rows is None and model.device.type == "cpu":
        batch_rows = CPU_BATCH_ROWS
    scheduler = Scheduler(model, parallel, max_batch_rows=batch_rows)
    try:
        app = create_app(Backend(model, scheduler), max_body=max_body)
        print(f"gguflm serve: {model!r}, {parallel} slots of {scheduler.n_ctx} tokens; "
              f"chat page and API at http://{host}:{port}/", file=sys.stderr, flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        scheduler.close()
