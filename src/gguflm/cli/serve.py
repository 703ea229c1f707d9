"""`gguflm serve`: the OpenAI-compatible server and chat page."""

from __future__ import annotations

import argparse
import os

from gguflm.cli import UserError, options
from gguflm.models import resolve

HELP = "serve a model over an OpenAI-compatible HTTP API, with a chat page"
DESCRIPTION = """\
Serve a GGUF model over HTTP: POST /v1/chat/completions and /v1/completions (streamed
or not), GET /v1/models, GET /health, and a chat page at /. Concurrent requests are
decoded together (continuous batching); requests beyond --parallel wait their turn.

  gguflm serve -m model.gguf --port 8080 --parallel 8
  then point an OpenAI client at http://127.0.0.1:8080/v1 (any API key unless --api-key).

Beyond one process (docs/scaling.md): --tensor-parallel N splits the model over N
processes (one GPU each, or CPU processes over gloo); --replicas N serves N whole
engines behind Ray Serve on a local Ray (pip install 'gguflm[ray]').

  gguflm serve -m model.gguf --tensor-parallel 2
  gguflm serve -m model.gguf --replicas 2 --parallel 8

Access: requests must name this server in their Host header (localhost, an IP address,
the --host name, or --allowed-hosts); web pages of other origins are refused (403) unless
listed with --cors-origins; with --api-key (or $GGUFLM_API_KEY) every /v1/ request needs
'Authorization: Bearer KEY'. See docs/server.md."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    options.add_device(p)
    p.add_argument("--parallel", "-np", type=int, default=4,
                   help="requests decoded together; each holds a KV cache slot (default: %(default)s)")
    options.add_ctx_size(p, help="context tokens of each slot (default: the model's training context, at most 4096)")
    options.add_threads(p)
    p.add_argument("--batch-rows", type=int, default=None,
                   help="most requests decoded in one forward; more run as several forwards "
                        "(default: 64 on the CPU, past which wider forwards barely pay; else all)")
    p.add_argument("--kv-size", type=int, default=None, metavar="N",
                   help="positions in the KV cache's block pool, shared by all requests as they grow "
                        "(default: --parallel x -c); with --device cuda it turns on the paged cache there "
                        "(otherwise one contiguous context per slot)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="CPU: a request's output is the same to the bit alone or among others, however "
                        "its prompt is batched (a lone request decodes ~1.35x slower; docs/server.md)")
    p.add_argument("--max-body", type=int, default=1 << 20,
                   help="largest accepted request body in bytes (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $GGUFLM_API_KEY, else none; "
                        "the chat page asks for it)")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated host names accepted in the Host header besides localhost, IP "
                        "addresses and --host ('*': any; for a reverse proxy or a DNS name)")
    p.add_argument("--cors-origins", default="", metavar="ORIGINS",
                   help="comma-separated origins (http://host:port) whose web pages may call the API "
                        "('*': any; default: none, only the server's own page)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close connections that take longer to send a request's headers (default: %(default)s)")
    p.add_argument("--tensor-parallel", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N processes: heads and FFN rows, one all-reduce per "
                        "attention and FFN (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="serve N whole engines behind Ray Serve on a local Ray (the ray extra); "
                        "requests are spread over them")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.parallel <= 256:
        raise UserError("--parallel must lie in [1, 256]")
    if not 0 <= args.port <= 65535:
        raise UserError("--port must lie in [0, 65535]")
    threads = options.check_threads(args)
    if args.batch_rows is not None and args.batch_rows < 1:
        raise UserError("--batch-rows must be at least 1")
    if args.kv_size is not None and not 1 <= args.kv_size <= (1 << 24):
        raise UserError("--kv-size must lie in [1, 16777216]")
    if args.max_body < 1:
        raise UserError("--max-body must be positive")
    if not 0 < args.header_timeout <= 3600:
        raise UserError("--header-timeout must lie in (0, 3600] seconds")
    api_key = args.api_key if args.api_key is not None else os.environ.get("GGUFLM_API_KEY") or None
    if api_key is not None and (not api_key or not api_key.isprintable() or not api_key.isascii()
                                or " " in api_key):
        raise UserError("--api-key must be printable ASCII without spaces")
    if not 1 <= args.tensor_parallel <= 64:
        raise UserError("--tensor-parallel must lie in [1, 64]")
    if args.replicas is not None and not 1 <= args.replicas <= 64:
        raise UserError("--replicas must lie in [1, 64]")
    if args.replicas is not None:
        import ray.serve  # noqa: F401  (the ray extra, checked before anything loads)
    device = options.device(args, "serve")
    path = resolve(args.model)
    from gguflm import GGUFFile

    with GGUFFile(path) as f:
        options.check_context(f, args.ctx_size, device, n_slots=args.parallel)
        if args.tensor_parallel > 1:
            from gguflm.model.arch import WeightTable
            from gguflm.model.config import ModelConfig
            from gguflm.model.parallel import check

            check(WeightTable(f, ModelConfig.from_gguf(f)), args.tensor_parallel)
    if args.replicas is not None:
        from gguflm.server.ray_serve import run_local

        run_local(path, args.replicas, args.host, args.port, args.log_level, device=device,
                  parallel=args.parallel, n_ctx=args.ctx_size, threads=threads, batch_rows=args.batch_rows,
                  tp=args.tensor_parallel, max_body=args.max_body, api_key=api_key,
                  allowed_hosts=tuple(h for h in args.allowed_hosts.split(",") if h),
                  cors_origins=tuple(o for o in args.cors_origins.split(",") if o),
                  kv_size=args.kv_size, batch_invariant=args.batch_invariant)
        return 0
    from gguflm.server import Security, serve

    security = Security(args.host, allowed_hosts=tuple(args.allowed_hosts.split(",")),
                        cors_origins=tuple(args.cors_origins.split(",")), api_key=api_key)
    try:
        serve(path, args.host, args.port, device, args.parallel, args.ctx_size,
              threads, args.max_body, args.log_level, args.batch_rows, security=security,
              header_timeout=args.header_timeout, tp=args.tensor_parallel, kv_size=args.kv_size,
              batch_invariant=args.batch_invariant)
    except OSError as e:  # ModelFileChanged included
        raise UserError(str(e)) from None
    return 0
