"""Where a cold start's time goes, and the progress line of a first compilation.

``GGUFLM_TIMING=1`` prints one ``gguflm timing:`` line on stderr per phase of the CUDA
path's start (CUDA init, weights to the device, the nvcc build, each Triton compilation
with its kernel and seconds, the decode graph capture), each with the seconds since the
process started. Off (the default), :func:`phase` and :func:`note` do nothing and the
Triton hooks only watch compilations (never a launch of a compiled kernel).

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
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        start = boot + ticks / os.sysconf("SC_CLK_TCK")
        return start if start <= _t0 else _t0
    except (OSError, ValueError, IndexError, StopIteration):
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
# Triton compilations: timed by Triton's JIT hooks (called around each compilation only)
# ---------------------------------------------------------------------------------------

_lock = threading.Lock()
_started: dict[tuple, float] = {}
_compiled = {"n": 0, "seconds": 0.0, "first": 0.0, "announced": False, "cache": ""}
_installed = False


def _label(fn, compile_info) -> str:
    """``name[CONST=value, ...]`` of the specialization being compiled."""
    try:
        names = fn.jit_function.arg_names
        consts = []
        for path, value in (compile_info.get("constants") or {}).items():
            i = path[0] if isinstance(path, tuple) else path
            name = names[i] if isinstance(i, int) and i < len(names) else str(i)
            value = getattr(value, "__name__", None) or getattr(getattr(value, "fn", None), "__name__", None) or value
            consts.append(f"{name}={value}")
        label = f"{fn.name}[{', '.join(consts)}]" if consts else fn.name
    except Exception:  # a Triton whose hook arguments differ: the name alone
        label = str(getattr(fn, "name", "kernel"))
    return label[:160]


def _pre(prev):
    def hook(**kw):
        try:
            with _lock:
                _started[(id(kw["fn"].jit_function), str(kw["key"]), threading.get_ident())] = time.perf_counter()
        except Exception:  # never in the way of a compilation
            pass
        return prev(**kw) if prev is not None else None
    return hook


def _post(prev):
    def hook(**kw):
        try:
            fn = kw["fn"]
            with _lock:
                t = _started.pop((id(fn.jit_function), str(kw["key"]), threading.get_ident()), None)
            if t is not None:
                seconds = time.perf_counter() - t
                hit = seconds < CACHE_HIT_S
                if not hit:
                    _count(seconds)
                if ON:
                    note(f"triton {'load (disk cache)' if hit else 'compile'} {_label(fn, kw.get('compile') or {})}",
                         seconds)
        except Exception:  # never in the way of a compilation
            pass
        return prev(**kw) if prev is not None else None
    return hook


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


def _serializable() -> bool:
    """With a hook set, Triton serializes each specialization to JSON before compiling it;
    a Triton that cannot serialize a @triton.jit function given as a constexpr (the
    quantized types' decoders are) would then fail every such compilation: no hooks there."""
    from types import SimpleNamespace

    from triton.runtime.jit import serialize_specialization_data

    from gguflm.quant.triton.codecs import _q4_0

    serialize_specialization_data("probe", {}, {(0,): _q4_0}, {}, SimpleNamespace(), "key", SimpleNamespace())
    return True


def watch_triton(cache_dir: str) -> None:
    """Install the compile hooks (once; chained after any hook already set). A Triton
    without ``triton.knobs.runtime``'s JIT hooks: nothing is watched."""
    global _installed
    _compiled["cache"] = cache_dir
    if _installed:
        return
    try:
        from triton import knobs

        rt = knobs.runtime
        if not (hasattr(rt, "jit_cache_hook") and hasattr(rt, "jit_post_compile_hook")) or not _serializable():
            return
        rt.jit_cache_hook = _pre(rt.jit_cache_hook)
        rt.jit_post_compile_hook = _post(rt.jit_post_compile_hook)
        _installed = True
    except Exception:  # an older Triton: no progress line, no per-kernel timing
        return
