"""Where a cold start's time goes, and the progress line of a first compilation.

``GGUFLM_TIMING=1`` prints one ``gguflm timing:`` line on stderr per phase of the CUDA
path's start (CUDA init, weights to the device, the nvcc build, each Triton compilation
with its kernel and seconds, the decode graph capture), each with the seconds since the
process started. Off (the default), :func:`phase` and :func:`note` do nothing, and the
wrapper of Triton's compile step runs on a kernel cache miss only (never for a launch).

The progress line: the first Triton compilation that is not a disk-cache hit prints
``gguflm: compiling the Triton kernels (first run; cached in DIR) ...``, and
:func:`settled` (after the decode step's first run) the count and seconds; nothing is
printed when every kernel came from the cache. nvcc's build prints its own pair of lines
(:mod:`gguflm.quant.cuda.build`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

ON = os.environ.get("GGUFLM_TIMING", "0") not in ("", "0")
PREFIX = "gguflm timing:"
CACHE_HIT_S = 0.05  # a Triton "compilation" faster than this was a load from the disk cache

_t0 = time.time()


def _process_start() -> float:
    """The wall-clock time this process started (Linux: /proc), else this module's import."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:  # (not /proc/stat's btime: whole seconds)
            boot = time.time() - float(f.read().split()[0])
        start = boot + ticks / os.sysconf("SC_CLK_TCK")
        return start if start <= _t0 else _t0
    except (OSError, ValueError, IndexError):
        return _t0


START = _process_start()


def since_start() -> float:
    return time.time() - START


def note(what: str, seconds: float | None = None, at: float | None = None) -> None:
    """One ``gguflm timing:`` line (only with GGUFLM_TIMING=1): ``at`` (a ``time.time()``,
    default now) as seconds since the process started, what, and how long it took."""
    if ON:
        took = "" if seconds is None else f"  {seconds:.3f} s"
        since = since_start() if at is None else at - START
        print(f"{PREFIX} {since:8.3f} s  {what}{took}", file=sys.stderr, flush=True)


@contextmanager
def phase(what: str, sync=None) -> Iterator[None]:
    """Time the block (with ``sync()`` called at its end, e.g. a device synchronize) when on."""
    if not ON:
        yield
        return
    t = time.perf_counter()
    yield
    if sync is not None:
        sync()
    note(what, time.perf_counter() - t)


# ---------------------------------------------------------------------------------------
# Triton compilations: JITFunction._do_compile (called on a miss of a kernel's in-memory
# cache only: never for a launch of a compiled kernel) timed by a wrapper. Triton's own
# jit_cache_hook is not used: with a hook set, Triton 3.6 serializes every specialization
# to JSON and fails on a @triton.jit function given as a constexpr (our decoders).
# ---------------------------------------------------------------------------------------

_lock = threading.Lock()
_compiled = {"n": 0, "seconds": 0.0, "first": 0.0, "announced": False, "cache": ""}
_installed = False


def _label(fn, args: tuple) -> str:
    """``name[CONST=value, ...]`` of the specialization being compiled (``args``: those of
    ``_do_compile``: key, signature, device, constexprs, ...)."""
    name = getattr(fn, "__name__", "kernel")
    try:
        names = fn.arg_names
        consts = []
        for path, value in (args[3] if len(args) > 3 and isinstance(args[3], dict) else {}).items():
            i = path[0] if isinstance(path, tuple) else path
            arg = names[i] if isinstance(i, int) and i < len(names) else str(i)
            value = getattr(value, "__name__", None) or getattr(getattr(value, "fn", None), "__name__", None) or value
            consts.append(f"{arg}={value}")
        label = f"{name}[{', '.join(consts)}]" if consts else name
    except Exception:  # another Triton's layout: the name alone
        label = name
    return label[:160]


def compiled(fn, args: tuple, seconds: float) -> None:
    """Account one ``_do_compile`` of ``fn`` that took ``seconds`` (a disk-cache load when fast)."""
    hit = seconds < CACHE_HIT_S
    if not hit:
        _count(seconds)
    if ON:
        note(f"triton {'load (disk cache)' if hit else 'compile'} {_label(fn, args)}", seconds)


def _timed(orig):
    def _do_compile(self, *args, **kwargs):
        t = time.perf_counter()
        kernel = orig(self, *args, **kwargs)
        if kernel is not None:
            try:
                compiled(self, args, time.perf_counter() - t)
            except Exception:  # never in the way of a compilation
                pass
        return kernel
    _do_compile.__wrapped__ = orig
    return _do_compile


def _count(seconds: float) -> None:
    with _lock:
        announce = not _compiled["announced"]
        if announce:
            _compiled["announced"] = True
            _compiled["first"] = time.perf_counter() - seconds
        _compiled["n"] += 1
        _compiled["seconds"] += seconds
    if announce:
        print(f"gguflm: compiling the Triton kernels (first run; cached in {_compiled['cache']}) ...",
              file=sys.stderr, flush=True)


def settled() -> None:
    """The first compilations are over (the decode step has run once): the progress line's
    end, if a compilation was announced and not yet closed."""
    with _lock:
        if not _compiled["announced"] or _compiled["n"] == 0:
            return
        n, busy, wall = _compiled["n"], _compiled["seconds"], time.perf_counter() - _compiled["first"]
        _compiled["n"], _compiled["seconds"] = 0, 0.0
    print(f"gguflm: compiled {n} Triton kernel{'s' if n > 1 else ''} in {wall:.1f} s "
          f"({busy:.1f} s of compiler time)", file=sys.stderr, flush=True)


def watch_triton(cache_dir: str) -> None:
    """Time Triton's compilations (once per process). A Triton without
    ``JITFunction._do_compile``: nothing is watched (no progress line, no timing)."""
    global _installed
    _compiled["cache"] = cache_dir
    if _installed:
        return
    try:
        from triton.runtime.jit import JITFunction

        if callable(getattr(JITFunction, "_do_compile", None)):
            JITFunction._do_compile = _timed(JITFunction._do_compile)
            _installed = True
    except Exception:  # no Triton here
        return
