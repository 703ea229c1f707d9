"""The registry of GGML tensor types and the block view every dequantizer reads.

Each supported type is one subclass of :class:`QuantType`, declared as
``class Q4_0(QuantType, ggml_type=GGMLType.Q4_0)``; ``__init_subclass__`` files it in
the registry and attaches the type's block layout from ``gguflm.gguf.types.LAYOUTS``.
A subclass implements one thing, :meth:`QuantType.dequantize_blocks`, written with
torch ops only so that it runs unchanged on any device.

Float rules shared by all types (ggml-quants.c compiles for baseline x86-64, no FMA):
every ``a*b + c`` is two roundings, done here as two torch ops, never fused (torch's
``addcmul`` is fused on CPU); F16 scales are widened with ggml's exact conversion
(:func:`f16_bits_to_f32`), NaN payloads included; NaN choices of x86 are reproduced
(:func:`combine_like_c`, and sign flips by XOR in the I-quants).

On CPU the result is bit-identical to libggml, NaN payloads included. On CUDA every
non-NaN value is bit-identical and NaNs sit in the same places, but a NaN computed by
GPU arithmetic carries the GPU's canonical payload.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from gguflm.errors import GGUFError
from gguflm.gguf.types import LAYOUTS, GGMLType, Layout

if sys.byteorder != "little":  # pragma: no cover - GGUF blocks are viewed in native order
    raise ImportError("gguflm.quant needs a little-endian machine")

_REGISTRY: dict[GGMLType, type[QuantType]] = {}


# ---------------------------------------------------------------------------------------
# Exact float conversions
# ---------------------------------------------------------------------------------------

def _f16_table_bits(device: torch.device) -> torch.Tensor:
    """float32 bit patterns of all 65536 half-precision values, as ggml widens them.

    normal (exp 1..30):  sign | (exp + 112) << 23 | man << 13
    subnormal (exp 0):   sign | bits(man * 2**-24)        (exact in float32)
    inf/NaN (exp 31):    sign | 0x7F800000 | man << 13 | (man != 0) << 22
    The last line is what ggml's ``fp32_from_bits(...) * 0x1p-112f`` gives on x86:
    the multiply keeps the payload and sets the quiet bit of a signalling NaN.
    """
    h = torch.arange(65536, dtype=torch.int32, device=device)
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    normal = ((exp + 112) << 23) | (man << 13)
    subnormal = (man.to(torch.float32) * 2.0**-24).view(torch.int32)
    infnan = 0x7F800000 | (man << 13) | ((man != 0).to(torch.int32) << 22)
    bits = torch.where(exp == 0x1F, infnan, torch.where(exp == 0, subnormal, normal))
    return sign | bits


@functools.cache
def _f16_table(device: torch.device) -> torch.Tensor:
    return _f16_table_bits(device).view(torch.float32)


def lookup(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``values[idx]`` for a table (m, ...) and integer indices (...) in 0..m-1:
    shape (..., *values.shape[1:]). A flat ``index_select`` (several times faster on CPU
    than advanced indexing)."""
    flat = torch.index_select(values, 0, idx.reshape(-1).to(torch.int32))
    return flat.view(*idx.shape, *values.shape[1:])


def f16_bits_to_f32(bits: torch.Tensor) -> torch.Tensor:
    """ggml's GGML_FP16_TO_FP32 on a tensor of raw half bit patterns (uint16 or any
    wider int dtype; only the low 16 bits count).

    Implemented as a lookup in the 65536-entry table above (one gather), so it is exact
    on every device, independent of how torch converts float16 (its scalar and vector
    CPU paths disagree on NaN payloads).
    """
    idx = bits.to(torch.int32) if bits.dtype == torch.uint16 else bits.to(torch.int32) & 0xFFFF
    return lookup(_f16_table(bits.device), idx)


def f16_to_f32(bits: torch.Tensor) -> torch.Tensor:
    """:func:`f16_bits_to_f32` of a uint16 tensor, fast: torch's own float16 -> float32
    conversion is exact for every non-NaN half; only when a NaN is present (the sum is
    NaN, or inf - inf: a harmless false alarm) is the exact table used instead."""
    x = bits.view(torch.float16).to(torch.float32)
    if bool(torch.isnan(x.sum())):
        return f16_bits_to_f32(bits)
    return x


def bf16_bits_to_f32(bits: torch.Tensor) -> torch.Tensor:
    """ggml's GGML_BF16_TO_FP32: the 16 bits become the top half of a float32."""
    return ((bits.to(torch.int32) & 0xFFFF) << 16).view(torch.float32)


def combine_like_c(prod: torch.Tensor, other: torch.Tensor, scale: torch.Tensor,
                   subtract: bool = False, finite: bool | None = None) -> torch.Tensor:
    """``prod + other`` (or ``prod - other``) in place of ``prod``, with C's NaN payload.

    On x86 an SSE add/sub whose two operands are both NaN returns the first operand's
    NaN (ggml writes ``x*d + m``, ``d1*q - m1``); torch's CPU kernels return the second's.
    ``prod`` (n, ...) can only be NaN in blocks whose ``scale`` (n, ...) has a non-finite
    entry, so only those blocks (none in a sane file) are redone with the product's NaN.
    ``finite``: whether every scale is known to be finite (None: test it here, cheaply
    through the sum, whose overflow would only cost time).
    """
    if finite is None:
        finite = bool(torch.isfinite(scale.sum()))
    if finite:
        return prod.sub_(other) if subtract else prod.add_(other)
    rows = ~torch.isfinite(scale).flatten(1).all(dim=1)  # (n,) blocks where prod may hold NaN
    saved = prod[rows]  # a copy of those few blocks
    if subtract:
        prod.sub_(other)
    else:
        prod.add_(other)
    prod[rows] = torch.where(torch.isnan(saved), saved, prod[rows])
    return prod


def split_bits(b: torch.Tensor, shifts: Sequence[int], width: int, dim: int) -> torch.Tensor:
    """Bit fields of an integer tensor along a new axis: with ``b`` of shape (..., k),
    ``out`` has a new axis at ``dim`` of size ``len(shifts)`` and
    ``out[.., s, ..] = (b >> shifts[s]) & (2**width - 1)``.

    Each field is one shift and one mask over a contiguous copy of ``b``, then one
    ``stack``: vectorized ops on contiguous memory; a single broadcast shift over the
    strided field is several times slower on CPU.
    """
    b = b.contiguous()
    mask = (1 << width) - 1
    top = b.dtype == torch.uint8  # the highest field of a uint8 needs no mask
    fields = [b & mask if s == 0 else (b >> s) if top and s + width == 8 else (b >> s) & mask
              for s in shifts]
    return torch.stack(fields, dim=dim)


def scaled(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``float(q) * scale`` for integer codes ``q`` (exact conversion, one rounding), as a
    conversion then an in-place product: torch's mixed integer * float ``mul`` is many
    times slower on CPU."""
    return q.to(torch.float32).mul_(scale)


def table(values: Sequence[float | int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant lookup table on ``device`` (cached)."""
    return _table(tuple(values), dtype, device)


@functools.cache
def _table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------
# Block view
# ---------------------------------------------------------------------------------------

# layout dtype -> torch dtype the field's bytes are viewed as (widened in Blocks.field)
_FIELD_VIEWS: dict[str, torch.dtype] = {
    "u1": torch.uint8,
    "i1": torch.int8,
    "<i2": torch.int16,
    "<u2": torch.uint16,  # widened to int32 below
    "<f2": torch.uint16,  # widened with f16_bits_to_f32 below
    "<f4": torch.float32,
}


class Blocks:
    """``n`` blocks of one type as a ``(n, type_size)`` uint8 tensor, read by field name.

    ``field(name)`` returns a ``(n, count)`` tensor: ``u1`` as uint8, ``i1`` as int8,
    ``<i2`` as int16, ``<u2`` as int32 (zero-extended), ``<f2`` as float32 (ggml's exact
    widening), ``<f4`` as float32.
    """

    def __init__(self, data: torch.Tensor, layout: Layout):
        self.data = data  # (n, type_size) uint8
        self.n = data.shape[0]
        self._fields = _field_slices(layout)

    def bytes(self, name: str) -> torch.Tensor:
        """The raw bytes of field ``name``: (n, nbytes) uint8."""
        start, stop, _ = self._fields[name]
        return self.data[:, start:stop]

    def f16_pair(self, first: str, second: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Two adjacent single F16 fields (``d`` then ``m``/``dmin``) as (n, 1) float32
        each, widened together, and whether all of them are finite (then every product of
        them with small integers is finite too, and NaN handling can be skipped)."""
        start, mid, _ = self._fields[first]
        mid2, stop, _ = self._fields[second]
        if mid != mid2 or stop - start != 4:  # pragma: no cover - internal invariant
            raise AssertionError(f"{first}, {second} are not two adjacent F16 fields")
        bits = reinterpret(self.data[:, start:stop], torch.uint16)  # (n, 2)
        x = bits.view(torch.float16).to(torch.float32)
        finite = bool(torch.isfinite(x.sum()))  # a sum of finite halves cannot overflow float32
        if not finite:
            x = f16_bits_to_f32(bits)
        return x[:, 0:1], x[:, 1:2], finite

    def field(self, name: str) -> torch.Tensor:
        start, stop, dtype = self._fields[name]
        raw = reinterpret(self.data[:, start:stop], _FIELD_VIEWS[dtype])
        if dtype == "<u2":
            return raw.to(torch.int32)
        if dtype == "<f2":
            return f16_to_f32(raw)
        return raw


@functools.cache
def _field_slices(layout: Layout) -> dict[str, tuple[int, int, str]]:
    """name -> (first byte, end byte, dtype) of each field of a block."""
    return {f.name: (off, off + f.nbytes, f.dtype) for f, off in zip(layout.fields, layout.offsets.values())}


def reinterpret(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., k * itemsize) uint8 -> (..., k) ``dtype``, the same bytes (little-endian).

    A view where torch allows one (offsets and strides multiples of the item size),
    else a view of a contiguous copy.
    """
    try:
        return raw.view(dtype)
    except RuntimeError:
        return raw.clone(memory_format=torch.contiguous_format).view(dtype)


# ---------------------------------------------------------------------------------------
# Registered types
# ---------------------------------------------------------------------------------------

class QuantType(ABC):
    """One GGML tensor type. Subclass with ``ggml_type=`` to register it."""

    ggml_type: ClassVar[GGMLType]
    layout: ClassVar[Layout]

    def __init_subclass__(cls, ggml_type: GGMLType, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if ggml_type in _REGISTRY:
            raise TypeError(f"{GGMLType(ggml_type).name} registered twice ({_REGISTRY[ggml_type].__name__}, {cls.__name__})")
        cls.ggml_type = GGMLType(ggml_type)
        cls.layout = LAYOUTS[cls.ggml_type]
        _REGISTRY[cls.ggml_type] = cls

    @staticmethod
    @abstractmethod
    def dequantize_blocks(b: Blocks) -> torch.Tensor:
        """(n, block_size) float32 values of the ``n`` blocks in ``b``."""


def quant_type(ggml_type: int) -> type[QuantType]:
    """The registered class of a type id; GGUFError naming the type otherwise."""
    try:
        gt = GGMLType(ggml_type)
    except ValueError:
        raise GGUFError(f"unknown ggml type id {ggml_type}") from None
    cls = _REGISTRY.get(gt)
    if cls is None:
        raise GGUFError(f"ggml type {gt.name} (id {int(gt)}) cannot be dequantized: "
                        "libggml has no to_float for it")
    return cls


def supported_types() -> tuple[GGMLType, ...]:
    """Every type :func:`dequantize` accepts."""
    return tuple(sorted(_REGISTRY))


def byte_tensor(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (uint8 numpy array or tensor) as a flat contiguous uint8 tensor,
    without a copy where it can. The bytes are often a zero-copy view of a read-only mmap,
    which torch warns it cannot guard against writes: nothing of ours writes to them
    (results are fresh tensors), so that warning is silenced here."""
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise TypeError(f"raw bytes must be uint8, got {raw.dtype}")
        return raw.reshape(-1).contiguous()
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        raise TypeError(f"raw bytes must be uint8, got {arr.dtype}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(arr).reshape(-1))


def dequantize(raw: np.ndarray | torch.Tensor, ggml_type: int, shape: Sequence[int],
               device: torch.device | str | None = None) -> torch.Tensor:
    """Dequantize one tensor, bit-identical to libggml's ``to_float``.

    ``raw``: the tensor's bytes (uint8 numpy array or torch tensor, e.g. the zero-copy
    ``GGUFFile.tensor_data`` view); ``shape``: ggml order, ``ne0`` (the contiguous row
    length) first. Returns float32 of shape ``tuple(reversed(shape))`` on ``device``
    (default: where ``raw`` lives). Byte count or row length inconsistent with the
    type's blocks -> GGUFError.
    """
    cls = quant_type(ggml_type)
    lay = cls.layout
    dims = tuple(int(d) for d in shape)
    name = cls.ggml_type.name
    if not dims or any(d < 0 for d in dims):
        raise GGUFError(f"{name} tensor has invalid shape {dims}")
    if dims[0] % lay.block_size:
        raise GGUFError(f"{name} tensor row length ne0={dims[0]} is not a multiple of its block size {lay.block_size}")
    n_elements = math.prod(dims)
    n_blocks = n_elements // lay.block_size
    data = byte_tensor(raw)
    if data.numel() != n_blocks * lay.type_size:
        raise GGUFError(f"{name} tensor of shape {dims} needs {n_blocks * lay.type_size} bytes "
                        f"({n_blocks} blocks of {lay.type_size}), got {data.numel()}")
    if device is not None:
        data = data.to(device)
    out_shape = tuple(reversed(dims))
    if n_blocks == 0:
        return torch.empty(out_shape, dtype=torch.float32, device=data.device)
    if data.device.type == "cpu" and lay.block_size > 1 and _cpu_kernel(cls.ggml_type):
        # The compiled CPU kernels decode blocks to the same bits as libggml several times
        # faster (the tests run both paths); other devices and types use torch.
        from gguflm.quant import cpu

        rows = torch.arange(n_elements // dims[0], dtype=torch.int64)
        out = cpu.ops().dequantize_rows(data.contiguous(), int(cls.ggml_type), rows.numel(), dims[0], rows)
        # The kernels follow ggml on finite values; NaN/inf (non-finite scales, never in a
        # sane file) take the torch path, which also matches C's NaN signs and payloads.
        # One sum finds them (a finite sum that overflows only costs the slower path).
        if bool(torch.isfinite(out.sum())):
            return out.reshape(out_shape)
    values = cls.dequantize_blocks(Blocks(data.view(n_blocks, lay.type_size), lay))
    return values.reshape(out_shape)


_USE_CPU_KERNELS = os.environ.get("GGUFLM_CPU_KERNELS", "1") != "0"


def use_cpu_kernels(enable: bool) -> bool:
    """Let :func:`dequantize` use the compiled CPU kernels (gguflm.quant.cpu) where they
    cover a type, or force the torch path; returns the previous setting. Both paths are
    bit-identical to libggml (the tests run each)."""
    global _USE_CPU_KERNELS
    previous, _USE_CPU_KERNELS = _USE_CPU_KERNELS, bool(enable)
    return previous


def _cpu_kernel(ggml_type: GGMLType) -> bool:
    if not _USE_CPU_KERNELS:
        return False
    from gguflm.quant import cpu

    return cpu.supports(ggml_type)
