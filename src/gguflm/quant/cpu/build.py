"""Build (once, cached) and load the C++ kernels of ``kernels.cpp`` as ``torch.ops.gguflm_cpu``.

The extension is compiled from our own source with torch's compiler driver on first use
(10-40 s with gcc) into ``$GGUFLM_KERNEL_CACHE`` (default ``~/.cache/gguflm/kernels``),
under a name that carries a hash of the source and flags, so an edited kernel never loads
a stale build. Later processes load the built library directly, without importing
``torch.utils.cpp_extension`` (0.2 s and 12 MB). It is registered with ``TORCH_LIBRARY``
(no pybind11), which keeps the build light and each call at about a microsecond of dispatch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
# -fopenmp: at::parallel_for is a header template that runs serially unless _OPENMP is
# defined; libgomp resolves to the copy torch has already loaded (one thread pool).
# -march=native: the portable path is vectorized for this CPU (AVX2 where there is no
# AVX-512); the build is keyed by this CPU's feature flags, so a cache shared between
# machines never loads code built for another CPU.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-DNDEBUG", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


class KernelsUnavailable(RuntimeError):
    """The C++ kernels could not be built or loaded here (no compiler, failed build)."""


def _cpu_features() -> str:
    """The CPU's feature flags (Linux) or its name: what -march=native compiled for."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.machine() + platform.processor()


def _name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS + LDFLAGS).encode() + torch.__version__.encode()
                            + _cpu_features().encode())
    return f"gguflm_cpu_{digest.hexdigest()[:12]}"


def _cache_dir() -> Path:
    root = os.environ.get("GGUFLM_KERNEL_CACHE") or Path.home() / ".cache" / "gguflm" / "kernels"
    return Path(root)


@functools.cache
def ops():
    """``torch.ops.gguflm_cpu`` after loading (building first, if needed) the extension;
    KernelsUnavailable (with the compiler's message) when that fails."""
    name = _name()
    build_dir = _cache_dir() / name
    library = build_dir / f"{name}.so"
    if library.exists():
        try:
            torch.ops.load_library(str(library))
            return torch.ops.gguflm_cpu
        except OSError:  # a build in progress elsewhere: load() below waits for its lock
            pass
    from torch.utils import cpp_extension

    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                           build_directory=str(build_dir), is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as e:  # compiler missing or build error
        raise KernelsUnavailable(f"cannot build the gguflm CPU kernels: {e}") from e
    return torch.ops.gguflm_cpu
