"""One `gguflm serve` process per test session (SmolLM2, 16 slots, loopback only), an
OpenAI client pointed at it, and helpers shared by the server tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PARALLEL = 16
N_CTX = 512
HOST = "127.0.0.1"  # every request of these tests goes to this machine's loopback only

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Who wrote Hamlet?", "Explain gravity in one sentence.", "What is 2+2?", "Name a color.",
    "Tell me a joke.", "Translate 'hello' to Spanish.", "What is Python?", "Describe a cat.",
    "How many legs does a spider have?", "What is the boiling point of water?",
    "Give me a synonym for happy.", "What day comes after Monday?", "Say hi.",
]


@dataclass
class Server:
    """A running server: its base URL and process."""

    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Poll /health until no slot is busy and nothing waits; returns the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if (h["slots_processing"] == 0 and h["requests_waiting"] == 0) or time.monotonic() > deadline:
                return h
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _start(spawn, model: Path, log: Path, timeout: float = 240.0, extra: tuple[str, ...] = (),
           parallel: int = PARALLEL, n_ctx: int = N_CTX) -> Server:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "gguflm", "serve", "-m", str(model), "--host", HOST, "--port", str(port),
           "--parallel", str(parallel), "-c", str(n_ctx), "--log-level", "warning", *extra]
    with log.open("wb") as out:       # the server dies with pytest (spawn), so no run leaves it behind
        proc = spawn(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(f"http://{HOST}:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            spawn.stop(proc)
            pytest.fail(f"gguflm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    spawn.stop(proc, grace=1.0)
    pytest.fail(f"gguflm serve did not answer /health within {timeout}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory, spawn) -> Iterator[Server]:
    pytest.importorskip("fastapi", reason="the server needs .[server]")
    pytest.importorskip("uvicorn", reason="the server needs .[server]")
    log = tmp_path_factory.mktemp("server") / "serve.log"
    srv = _start(spawn, smollm2_path, log)
    try:
        yield srv
    finally:
        spawn.stop(srv.proc, grace=20.0)


@pytest.fixture(scope="session")
def start_server(spawn):
    """``start_server(model, log, *flags)``: a context manager running a server of its own
    (4 slots of 256 tokens, started with ``flags``), stopped on leaving."""

    @contextlib.contextmanager
    def running(model: Path, log: Path, *extra: str, parallel: int = 4, n_ctx: int = 256) -> Iterator[Server]:
        pytest.importorskip("fastapi", reason="the server needs .[server]")
        pytest.importorskip("uvicorn", reason="the server needs .[server]")
        srv = _start(spawn, model, log, extra=extra, parallel=parallel, n_ctx=n_ctx)
        try:
            yield srv
        finally:
            spawn.stop(srv.proc, grace=20.0)

    return running


def rewrite_gguf(src: Path, dst: Path, metadata: dict) -> Path:
    """A copy of ``src`` with some metadata replaced (``{key: (GGUFValueType, value, sub_type)}``),
    written by gguf-py's own writer (llama.cpp's Python package)."""
    gguf = pytest.importorskip("gguf")
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src, "r")
    writer = gguf.GGUFWriter(dst, arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(),
                             endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {k: MetadataDetails(t, v, sub_type=sub)
                                            for k, (t, v, sub) in metadata.items()}, [])
    return dst


@pytest.fixture(scope="session")
def gguf_rewriter():
    """rewrite_gguf(src, dst, {key: (type, value, sub_type)}) -> dst."""
    return rewrite_gguf


@pytest.fixture(scope="session")
def client(server: Server):
    openai = pytest.importorskip("openai", reason="the real OpenAI client is the test driver; install .[dev]")
    return openai.OpenAI(base_url=server.api, api_key="not-needed", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def questions() -> list[str]:
    return list(QUESTIONS)


class _Ticket:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Scheduler:
    """Stands in for the scheduler: keeps the emit callback of the one submitted job."""

    def submit(self, job, emit):
        self.emit = emit
        return _Ticket()


@pytest.fixture
def fake_scheduler() -> _Scheduler:
    """A scheduler stand-in for ``Generation`` (server/backend.py): its ``emit`` sends events
    as the scheduler's thread would."""
    return _Scheduler()
