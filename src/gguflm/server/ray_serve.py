"""Replicas on Ray Serve: N copies of the OpenAI-compatible app of :mod:`gguflm.server.app`
(same routes, same server-sent events, same errors), each a whole engine (its model, its
scheduler decoding its requests together; optionally itself tensor parallel), behind
Ray Serve's HTTP proxy, which spreads requests over them and restarts a replica that dies.

Two ways to start it (``pip install 'gguflm[ray]'``):

    gguflm serve -m model.gguf --replicas 2          # a local Ray, started and stopped here
    serve run gguflm.server.ray_serve:build model=/path/model.gguf replicas=2   # an existing cluster
    serve run docs/ray-serve.yaml                    # the same from a config file

Each replica answers with an ``x-gguflm-replica`` header (its process id) so that a client
or a test can see where a request ran. A replica is an actor with ``num_cpus`` CPUs
(default: the threads it runs) or ``num_gpus`` GPUs (``device="cuda"``: ``tp`` of them).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from ray import serve

REPLICA_HEADER = "x-gguflm-replica"


class Replica:
    """One engine: the model, its scheduler on its own thread, the app; see the module doc.
    The arguments are :func:`gguflm.server.serve`'s."""

    def __init__(self, path: str, device: str = "cpu", parallel: int = 4, n_ctx: int | None = None,
                 threads: int | None = None, batch_rows: int | None = None, tp: int = 1,
                 max_body: int | None = None, host: str = "127.0.0.1", api_key: str | None = None,
                 allowed_hosts: tuple[str, ...] = (), cors_origins: tuple[str, ...] = (),
                 kv_size: int | None = None, batch_invariant: bool = False):
        from gguflm.server import Backend, Security, create_app
        from gguflm.server.app import DEFAULT_MAX_BODY

        # The model is loaded and run on one thread of its own, as `gguflm serve` runs it on
        # its main thread (a second thread running the CPU kernels brings a second OpenMP
        # team: see Scheduler); this constructor waits until it is loaded.
        loaded, box = threading.Event(), {}
        args = (path, device, parallel, n_ctx, threads, batch_rows, tp, kv_size, batch_invariant)
        self._thread = threading.Thread(target=_engine, args=(args, box, loaded), name="gguflm-engine", daemon=True)
        self._thread.start()
        loaded.wait()
        if "error" in box:
            raise box["error"]
        self.llm, self.scheduler = box["llm"], box["scheduler"]
        security = Security(host, allowed_hosts=tuple(allowed_hosts), cors_origins=tuple(cors_origins),
                            api_key=api_key)
        self._app = create_app(Backend(self.llm, self.scheduler), max_body=max_body or DEFAULT_MAX_BODY,
                               security=security)
        self._app.add_middleware(_ReplicaHeader, value=str(os.getpid()))

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose loop has stopped is replaced."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine's loop has stopped")

    def __del__(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close()
            self._thread.join(10)


def _engine(args, box: dict, loaded: threading.Event) -> None:
    """The engine thread of a :class:`Replica`: load, then run the scheduler's loop until
    it is closed, then release the model."""
    import gguflm
    from gguflm.server import make_scheduler

    path, device, parallel, n_ctx, threads, batch_rows, tp, kv_size, batch_invariant = args
    try:
        llm = gguflm.load(path, device=device, n_ctx=n_ctx, threads=threads, tp=tp)
        box["llm"], box["scheduler"] = llm, make_scheduler(llm, parallel, batch_rows, kv_size, batch_invariant)
    except BaseException as e:  # the constructor raises it: Ray reports the replica's failure
        box["error"] = e
        return
    finally:
        loaded.set()
    try:
        box["scheduler"].run()
    finally:
        llm.close()


class _ReplicaHeader:
    """ASGI middleware: every response names the replica's process."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), value.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def deployment(path: str | os.PathLike, replicas: int = 2, *, num_cpus: float | None = None,
               num_gpus: float | None = None, name: str = "gguflm", **engine: Any):
    """The Ray Serve application of ``replicas`` engines of the model at ``path``;
    ``engine``: :class:`Replica`'s arguments (device, parallel, n_ctx, threads, tp, ...).
    Each replica takes up to ``parallel`` requests at once and queues as many more."""
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    device, tp = str(engine.get("device", "cpu")), int(engine.get("tp", 1))
    threads = engine.get("threads")
    if num_cpus is None:
        num_cpus = threads * tp if threads else 1
    if num_gpus is None:
        num_gpus = tp if device.startswith("cuda") else 0
    parallel = int(engine.get("parallel", 4))
    cls = serve.ingress()(Replica)
    dep = serve.deployment(cls, name=name, num_replicas=replicas, max_ongoing_requests=2 * parallel,
                           ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
                           health_check_period_s=2, health_check_timeout_s=30,
                           graceful_shutdown_timeout_s=5)
    return dep.bind(str(path), **engine)


_INT_ARGS = ("replicas", "parallel", "n_ctx", "threads", "batch_rows", "tp", "max_body", "kv_size")


def build(args: dict[str, Any]):
    """The application builder of ``serve run gguflm.server.ray_serve:build model=PATH
    replicas=N ...`` (or a config file's ``args``): ``model`` (a path or a gguflm model
    name), ``replicas``, and :class:`Replica`'s arguments; strings are converted."""
    from gguflm.models import resolve

    args = dict(args)
    if "model" not in args:
        raise ValueError("the gguflm Ray Serve application needs model=PATH")
    path = str(resolve(args.pop("model")))
    for k in _INT_ARGS:
        if k in args and args[k] is not None:
            args[k] = int(args[k])
    for k in ("allowed_hosts", "cors_origins"):
        if isinstance(args.get(k), str):
            args[k] = tuple(x for x in args[k].split(",") if x)
    if isinstance(args.get("batch_invariant"), str):
        args["batch_invariant"] = args["batch_invariant"].lower() in ("1", "true", "yes")
    for k in ("num_cpus", "num_gpus"):
        if k in args and args[k] is not None:
            args[k] = float(args[k])
    return deployment(path, args.pop("replicas", 2), **args)


def run_local(path: str | os.PathLike, replicas: int, host: str = "127.0.0.1", port: int = 8080,
              log_level: str = "info", **engine: Any) -> None:
    """Start a local Ray (this machine's cores), serve ``replicas`` engines on
    ``host:port`` until interrupted (Ctrl-C or SIGTERM), then stop Ray and everything it
    started. ``engine``: as for :func:`deployment` (threads default: the cores divided
    among the replicas and their tensor-parallel ranks)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cores = os.cpu_count() or 1
    tp = int(engine.get("tp", 1))
    if engine.get("threads") is None and str(engine.get("device", "cpu")) == "cpu":
        engine["threads"] = max(1, cores // (replicas * tp))
    threads = engine.get("threads") or 1
    quiet = log_level in ("critical", "error", "warning")
    ray.init(num_cpus=max(cores, replicas * tp * threads), include_dashboard=False,
             log_to_driver=not quiet, logging_level=log_level.upper() if log_level != "critical" else "CRITICAL")
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": log_level.upper()
                                                                               if log_level != "critical"
                                                                               else "CRITICAL"})
        serve.run(deployment(path, replicas, host=host, **engine), name="gguflm", route_prefix="/")
        print(f"gguflm serve: {replicas} replicas of {path} on Ray Serve; API at http://{host}:{port}/v1",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
