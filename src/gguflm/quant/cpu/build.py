"""Build (once, cached) and load the C++ kernels of ``kernels.cpp`` as ``torch.ops.gguflm_cpu``.

The extension is compiled from our own source with torch's compiler driver on first use
(about 10 s with gcc) into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
under a name that carries a hash of the source, so an edited kernel never loads a stale
build. It is registered with ``TORCH_LIBRARY`` (no pybind11), which keeps the build
light and each call at about a microsecond of dispatch.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
# -fopenmp: at::parallel_for is a header template that runs serially unless _OPENMP is
# defined; libgomp resolves to the copy torch has already loaded (one thread pool).
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-DNDEBUG", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


class KernelsUnavailable(RuntimeError):
    """The C++ kernels could not be built or loaded here (no compiler, failed build)."""


@functools.cache
def ops():
    """``torch.ops.gguflm_cpu`` after building/loading the extension; KernelsUnavailable
    (with the compiler's message) when that fails."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS + LDFLAGS).encode() + torch.__version__.encode())
    name = f"gguflm_cpu_{digest.hexdigest()[:12]}"
    try:
        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                           is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as e:  # compiler missing or build error
        raise KernelsUnavailable(f"cannot build the gguflm CPU kernels: {e}") from e
    return torch.ops.gguflm_cpu
