"""libggml's own dequantizers, reached through ctypes: the oracle our torch code is
checked against.

llama-cpp-python ships libggml-base as a shared library inside its package folder
(``llama_cpp/lib/libggml-base.so``). ``ggml_get_type_traits(type)`` returns a pointer to

    struct ggml_type_traits {            // ggml/include/ggml.h
        const char * type_name;
        int64_t      blck_size;
        int64_t      blck_size_interleave;
        size_t       type_size;
        bool         is_quantized;
        ggml_to_float_t   to_float;      // void (*)(const void * x, float * y, int64_t k)
        ggml_from_float_t from_float_ref;
    };

and ``to_float(x, y, k)`` turns ``k`` elements (a whole number of blocks) into float32.
Types whose traits have no ``to_float`` but whose row dequantizer is exported anyway
(``dequantize_row_q8_K``) are reached through that symbol.

Import-safe without llama-cpp-python: :func:`available` says False and
:func:`ggml_to_float` raises :class:`OracleUnavailable`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np

from gguflm.gguf.types import GGMLType

__all__ = ["OracleUnavailable", "available", "ggml_to_float", "has_to_float", "type_traits"]

# Exported row dequantizers for types whose traits leave ``to_float`` empty.
_EXPORTED_ROW_DEQUANTIZERS: dict[GGMLType, str] = {GGMLType.Q8_K: "dequantize_row_q8_K"}

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class OracleUnavailable(RuntimeError):
    """libggml (from llama-cpp-python) cannot be loaded here."""


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def _library_path() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise OracleUnavailable("llama-cpp-python is not installed (pip install llama-cpp-python)")
    lib_dir = Path(spec.origin).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.so*")) + sorted(lib_dir.glob("libggml-base.dylib")) \
        + sorted(lib_dir.glob("ggml-base.dll"))
    if not candidates:
        raise OracleUnavailable(f"no libggml-base shared library in {lib_dir}")
    return candidates[0]


@functools.cache
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(_library_path()))
    except OSError as e:
        raise OracleUnavailable(f"cannot load libggml-base: {e}") from e
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    """True when libggml-base can be loaded from the installed llama-cpp-python."""
    try:
        _lib()
    except OracleUnavailable:
        return False
    return True


def type_traits(ggml_type: int) -> tuple[str, int, int]:
    """``(type_name, blck_size, type_size)`` as libggml declares them."""
    t = _traits(GGMLType(ggml_type))
    return t.type_name.decode(), int(t.blck_size), int(t.type_size)


def _traits(ggml_type: GGMLType) -> _TypeTraits:
    return _lib().ggml_get_type_traits(int(ggml_type)).contents


@functools.cache
def _to_float_fn(ggml_type: GGMLType):
    traits = _traits(ggml_type)
    if traits.to_float:
        return _TO_FLOAT(traits.to_float)
    symbol = _EXPORTED_ROW_DEQUANTIZERS.get(ggml_type)
    if symbol is not None:
        return _TO_FLOAT(ctypes.cast(getattr(_lib(), symbol), ctypes.c_void_p).value)
    return None


def has_to_float(ggml_type: int) -> bool:
    """Whether libggml can turn ``ggml_type`` into float32 (F32: its bytes are the floats)."""
    return ggml_type == GGMLType.F32 or _to_float_fn(GGMLType(ggml_type)) is not None


def ggml_to_float(raw: np.ndarray, ggml_type: int, n_elements: int) -> np.ndarray:
    """Dequantize ``n_elements`` values of ``ggml_type`` stored in ``raw`` with libggml.

    ``raw`` must hold exactly ``n_elements / blck_size * type_size`` bytes (ggml's own
    traits, so a wrong layout table cannot hide here). Returns a float32 array of
    ``n_elements`` values (F32, which has no to_float: a copy of the bytes).
    """
    gt = GGMLType(ggml_type)
    fn = _to_float_fn(gt)
    if fn is None and gt != GGMLType.F32:
        raise ValueError(f"libggml has no to_float for {gt.name}")
    _, blck, tsize = type_traits(gt)
    if n_elements < 0 or n_elements % blck:
        raise ValueError(f"{gt.name}: {n_elements} elements is not a whole number of {blck}-blocks")
    src = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    need = n_elements // blck * tsize
    if src.nbytes != need:
        raise ValueError(f"{gt.name}: {n_elements} elements need {need} bytes, got {src.nbytes}")
    if fn is None:
        return src.view(np.float32).copy()
    out = np.empty(n_elements, dtype=np.float32)
    if n_elements:
        fn(src.ctypes.data, out.ctypes.data, n_elements)
    return out
