"""Build (once, cached) and load the CUDA C++ kernels of ``gemv.cu`` as a ctypes library.

The source is compiled with ``nvcc`` for one GPU architecture (``sm_90`` for an H100/H200)
on first use into ``$GGUFLM_KERNEL_CACHE`` (default ``~/.cache/gguflm/kernels``), under a
name that carries the architecture and a hash of the source and flags, so an edited kernel
never loads a stale build and a cache shared between GPUs keeps one build per
architecture. The library has plain C entry points (no torch headers: it builds in seconds
per kernel and loads without ``torch.utils.cpp_extension``); the kernels are launched on
the caller's stream, so CUDA graphs capture them. The build runs one nvcc per part of the
file at once (``-DGGUFLM_PART=k``: the C entry points; the 1-row kernels of one type with or
without the SwiGLU epilogue, 6 instances each; those of the two pairs of types), then links
the objects (the same SASS as one translation unit; one nvcc over the whole file if that
fails, or with ``GGUFLM_NVCC_SPLIT=0``); model loads start it in a background thread
(:func:`start`). The parts are balanced so that the build's wall time is about its longest
part plus the link: one part per type had Q6_K's 12 kernels take 3.3 s against 1.6 s for a
pair's 2 (each part pays ~1.0 s of fixed work: host preprocessing twice, cudafe++, the host
compile); split by epilogue, the longest part (Q6_K SwiGLU) takes 2.3 s (nvcc 13.0, one
process at a time on a 2-core host; benchmarks/cuda_notes.md). The kernels
over several activation rows (the server's batched decode rows) are a second library
(``kind="rows"``, :data:`PARTS`) built the same way on their first use or :func:`start`, so
that generate()'s cold build never waits for them. A failed build raises
:class:`KernelsUnavailable` with the compiler's message; callers fall back to Triton.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gguflm.quant.cuda import timing

SOURCE = Path(__file__).with_name("gemv.cu")
# the SASS depends on --split-compile (off or =1 differs from =0, =2, =16 for 3 Q6_K kernels,
# nvcc 13.0), not on -lineinfo (source lines for the profilers; ~1 % of a part's time) nor
# on the host's -O level (which only the launch code and the CPU emulation see)
FLAGS = ["-O3", "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-ffp-contract=off", "--split-compile=0", "-lineinfo"]
# gemv.cu's GGUFLM_PART values of each library, compiled concurrently (see _split_build):
# "gemv" the 1-row kernels (what generate() needs, built at model load: part 0 the C entry
# points and the CPU emulation, 1-4 the plain kernels of Q4_0, Q8_0, Q4_K, Q6_K, 5-8 their
# SwiGLU kernels, 9 the two pairs'), "rows" the kernels over several activation rows (the
# server's batched decode rows: 10-15 one weight row per warp, 16-21 two, 22 the C entry
# points, 23-28 the tile kernels of one type or pair), built apart so that the 1-row
# library's cold build never compiles them. Fewer,
# larger parts make the longest part the build's wall time; more parts cost ~1.0 s of fixed
# CPU each (against the Triton compilations that run meanwhile at load)
PARTS = {"gemv": tuple(range(0, 10)), "rows": tuple(range(10, 29))}


class KernelsUnavailable(RuntimeError):
    """The CUDA kernels could not be built or loaded here (no nvcc, failed build)."""


def nvcc() -> str | None:
    """The CUDA compiler: ``$GGUFLM_NVCC``, ``nvcc`` on the PATH, or under ``$CUDA_HOME``."""
    for cand in (os.environ.get("GGUFLM_NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$GGUFLM_KERNEL_CACHE``, default ``~/.cache/gguflm/kernels``."""
    root = os.environ.get("GGUFLM_KERNEL_CACHE") or Path.home() / ".cache" / "gguflm" / "kernels"
    return Path(root)


def _name(arch: str, kind: str = "gemv") -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + arch.encode()
                            + (b"" if kind == "gemv" else kind.encode())).hexdigest()[:12]
    return f"gguflm_cuda_{arch}_{digest}" if kind == "gemv" else f"gguflm_cuda_{kind}_{arch}_{digest}"


_locks = {kind: threading.Lock() for kind in PARTS}
_built: dict[tuple[str, str], ctypes.CDLL | KernelsUnavailable] = {}
_started: set[tuple[str, str]] = set()


def library(arch: str = "sm_90", kind: str = "gemv") -> ctypes.CDLL:
    """The kernels of ``kind`` (:data:`PARTS`) built for ``arch`` (e.g. ``sm_90``), building
    them first if needed (once per process: a concurrent caller waits for the build; a
    failure is remembered)."""
    t = time.perf_counter()
    with _locks[kind]:
        if (arch, kind) not in _built:
            try:
                _built[arch, kind] = _load(arch, kind)
            except KernelsUnavailable as e:
                _built[arch, kind] = e
        elif timing.ON and (waited := time.perf_counter() - t) > 0.005:
            timing.note(f"waited for the background build of the CUDA {kind} kernels ({arch})", waited)
        lib = _built[arch, kind]
    if isinstance(lib, KernelsUnavailable):
        raise lib
    return lib


def start(arch: str, kind: str = "gemv") -> None:
    """Build (or load) the kernels of ``kind`` for ``arch`` in a background thread, so that
    nvcc runs while the model loads; :func:`library` then waits for it."""
    if (arch, kind) in _built or (arch, kind) in _started:        # never waits for a build in progress
        return
    _started.add((arch, kind))
    threading.Thread(target=lambda: _quiet(arch, kind), name=f"gguflm-nvcc-{kind}-{arch}", daemon=True).start()


def _quiet(arch: str, kind: str) -> None:
    try:
        library(arch, kind)
    except KernelsUnavailable:
        pass                            # said by the caller that needs the kernels


def _run(cmd: list[str]) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelsUnavailable(f"cannot run nvcc: {e}") from e
    if r.returncode != 0:
        raise KernelsUnavailable(f"nvcc failed ({r.returncode}): {r.stderr[-2000:]}")


def _compile(compiler: str, arch: str, out: str, kind: str = "gemv") -> None:
    """Build the library of ``kind`` into ``out``: its parts of gemv.cu concurrently then
    one link (``GGUFLM_NVCC_SPLIT=0``: one nvcc over the whole file, both kinds in one, also
    the fallback when the split build fails)."""
    gencode = f"-gencode=arch=compute_{arch[3:]},code={arch}"
    if os.environ.get("GGUFLM_NVCC_SPLIT", "1") != "0":
        try:
            _split_build(compiler, gencode, out, PARTS[kind])
            return
        except KernelsUnavailable as e:
            timing.note(f"the split nvcc build failed ({str(e)[:300]}); building one translation unit")
    _run([compiler, *FLAGS, gencode, "-o", out, str(SOURCE)])


def _split_build(compiler: str, gencode: str, out: str, parts: tuple[int, ...] = PARTS["gemv"]) -> None:
    """One nvcc per part of gemv.cu in ``parts`` (``-DGGUFLM_PART=k``: C entry points, or
    at most 6 kernels of one type or pair of types each: see :data:`PARTS`), all at once,
    then one link into ``out``."""
    flags = [f for f in FLAGS if f != "-shared"]
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
        objs = {k: os.path.join(tmp, f"part{k}.o") for k in parts}
        procs = []
        try:
            for k, obj in objs.items():
                procs.append(subprocess.Popen([compiler, *flags, gencode, f"-DGGUFLM_PART={k}", "-c", "-o", obj,
                                               str(SOURCE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True))
            errors = []
            for k, p in zip(objs, procs):
                try:
                    _, err = p.communicate(timeout=900)
                except subprocess.TimeoutExpired:
                    p.kill()
                    _, err = p.communicate()
                if p.returncode != 0:
                    errors.append(f"part {k} ({p.returncode}): {err[-1500:]}")
        except OSError as e:
            raise KernelsUnavailable(f"cannot run nvcc: {e}") from e
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if errors:
            raise KernelsUnavailable("nvcc failed: " + "; ".join(errors))
        _run([compiler, "-shared", gencode, "-o", out, *objs.values()])


def _load(arch: str, kind: str = "gemv") -> ctypes.CDLL:
    name = _name(arch, kind)
    lib = kernel_cache_dir() / name / f"lib{name}.so"
    what = "CUDA GEMV kernels" if kind == "gemv" else f"CUDA GEMV kernels ({kind})"
    t = time.perf_counter()
    if not lib.exists():
        compiler = nvcc()
        if compiler is None:
            raise KernelsUnavailable("nvcc (the CUDA compiler) was not found")
        lib.parent.mkdir(parents=True, exist_ok=True)
        print(f"gguflm: compiling the {what} for {arch} (first run; cached in {lib.parent}) ...",
              file=sys.stderr, flush=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            _compile(compiler, arch, tmp, kind)
        except KernelsUnavailable:
            os.unlink(tmp)
            raise
        os.replace(tmp, lib)             # atomic: a concurrent process sees the whole file or none
        took = time.perf_counter() - t
        print(f"gguflm: compiled the {what} for {arch} in {took:.1f} s", file=sys.stderr, flush=True)
        timing.note(f"nvcc build of the {what} ({arch}, {threading.current_thread().name})", took)
        t = time.perf_counter()
    try:
        got = ctypes.CDLL(str(lib))
    except OSError as e:
        raise KernelsUnavailable(f"cannot load {lib}: {e}") from e
    timing.note(f"{what} loaded ({arch}, {threading.current_thread().name})", time.perf_counter() - t)
    return got
