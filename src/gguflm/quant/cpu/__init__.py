"""Fused CPU kernels for GGUF quantized weights, and their plain-torch twins.

The weight stays in its GGUF block encoding (normally a zero-copy view of the file's
memory mapping); nothing dequantizes a whole model to float.

    qmatmul(x, w)             y = x @ W^T, x float32 [..., K], W [N, K] quantized.
        Few rows (decode):    fused dequantize x dot in C++ (AVX-512 when the CPU has it),
                              threaded over the rows of W; Q4_K with AVX-512 VNNI: the
                              codes times x written as 4 int8 digits (30 bits) per
                              element, exact integer sums (same accuracy class).
        Many rows (prefill):  W dequantized tile by tile (bit-identical to libggml) into an
                              sgemm.
    qmatmul_reference(x, w)   the twin: float64 matmul of the exactly dequantized weights.
    dequantize_rows(w, ids)   rows of W as float32, bit-identical to libggml's to_float.

Accuracy contract: each weight enters the dot product with its exact value (for the
scale/min types the kernel uses ``d * sum(q x) + m * sum(x)`` per 32-element group, the
real value of ``q * d + m``), and products are accumulated in float32. So the result
differs from the float64 twin by float32 accumulation error only: at most a few units of
``2**-24 * sum_k |W[n, k] x[k]|`` times log2(K).

:class:`QuantLinear` and :class:`QuantEmbedding` put these behind the model's linear layer
and embedding lookup; :func:`supports` says which GGML types have a kernel (the others
take the model's explicit float fallback).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from gguflm.gguf.types import LAYOUTS, GGMLType
from gguflm.quant.base import byte_tensor
from gguflm.quant.cpu.build import KernelsUnavailable, ops

__all__ = ["QuantWeight", "QuantLinear", "QuantEmbedding", "KernelsUnavailable", "available", "supports",
           "kernel_types", "qmatmul", "qmatmul_reference", "dequantize_rows", "use_simd", "simd_available",
           "use_vnni", "vnni_available", "set_batch_invariant"]


@functools.cache
def kernel_types() -> frozenset[GGMLType]:
    """The GGML types with a C++ kernel, each checked against the layout table: the C++
    block (elements, bytes) must equal ``LAYOUTS``' (block_size, type_size)."""
    triples = ops().kernel_types()
    out = set()
    for i in range(0, len(triples), 3):
        t, qk, nbytes = GGMLType(triples[i]), triples[i + 1], triples[i + 2]
        lay = LAYOUTS[t]
        if (qk, nbytes) != (lay.block_size, lay.type_size):
            raise KernelsUnavailable(f"C++ block of {t.name} is ({qk}, {nbytes}), layout table says "
                                     f"({lay.block_size}, {lay.type_size})")
        out.add(t)
    return frozenset(out)


def available() -> bool:
    """True when the kernels are built (or can be) and loaded."""
    try:
        kernel_types()
    except KernelsUnavailable:
        return False
    return True


def supports(ggml_type: int) -> bool:
    """True when ``ggml_type`` has a fused kernel here (and the kernels load)."""
    return available() and ggml_type in kernel_types()


def simd_available() -> bool:
    """True when this CPU runs the AVX-512 path (else the portable C++ path runs)."""
    return bool(ops().simd_available())


def use_simd(enable: bool) -> bool:
    """Choose the AVX-512 path (if the CPU has it) or the portable one; returns the previous
    choice. For tests and benchmarks: both paths have the same accuracy contract."""
    return bool(ops().use_simd(enable))


def vnni_available() -> bool:
    """True when this CPU runs the AVX-512 VNNI row kernels (Q4_K decode products)."""
    return bool(ops().vnni_available())


def use_vnni(enable: bool) -> bool:
    """Choose the VNNI row kernels (if the CPU has them; the AVX-512 path must be on) or the
    float32 ones for 1-2 activation rows; returns the previous choice. For tests and
    benchmarks: both keep the accuracy contract (docs/cpu-kernels.md)."""
    return bool(ops().use_vnni(enable))


def set_batch_invariant(enable: bool) -> bool:
    """Batch-invariant mode (process-wide; returns the previous setting): every row of a
    product and of the block step's attention is computed by the same code in the same
    order whatever the number of rows of its step (AVX-512: the panel kernels at every M,
    attention row by row), so a sequence's logits do not depend, to the bit, on who shares
    its step or how its prompt was chunked. It costs a lone decode row the row kernels'
    speed (docs/server.md). The portable path is not invariant."""
    return bool(ops().set_batch_invariant(enable))


class QuantWeight:
    """A ``[N, K]`` GGUF weight (ggml shape ``(K, N)``) kept in its block encoding.

    ``raw``: the tensor's bytes as a flat uint8 tensor or numpy array (zero-copy from the
    file mapping is the intent; it is only read).
    """

    def __init__(self, raw: np.ndarray | torch.Tensor, ggml_type: int, shape: Sequence[int]):
        self.ggml_type = GGMLType(ggml_type)
        if not supports(self.ggml_type):
            raise KernelsUnavailable(f"no CPU kernel for ggml type {self.ggml_type.name}")
        if len(shape) != 2:
            raise ValueError(f"a linear weight has 2 dims, got shape {tuple(shape)}")
        self.in_features, self.out_features = int(shape[0]), int(shape[1])  # K, N
        lay = LAYOUTS[self.ggml_type]
        if self.in_features % lay.block_size:
            raise ValueError(f"{self.ggml_type.name} row length {self.in_features} is not a multiple of "
                             f"{lay.block_size}")
        self.raw = byte_tensor(raw)
        if self.raw.device.type != "cpu":
            raise TypeError(f"raw weight bytes must be on the CPU, not {self.raw.device}")
        want = self.out_features * self.in_features // lay.block_size * lay.type_size
        if self.raw.numel() != want:
            raise ValueError(f"{self.ggml_type.name} weight of shape {tuple(shape)} needs {want} bytes, "
                             f"got {self.raw.numel()}")

    @property
    def shape(self) -> tuple[int, int]:
        """Torch order: (out_features, in_features)."""
        return self.out_features, self.in_features


def qmatmul(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """``x @ W^T``: x float32 [..., K] on the CPU -> float32 [..., N] (see module doc)."""
    x2 = x.reshape(-1, w.in_features)                                  # [M, K]
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = ops().qmatmul(x2, w.raw, int(w.ggml_type), w.out_features, w.in_features)  # [M, N]
    return y.view(*x.shape[:-1], w.out_features)


def qmatmul_reference(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """The plain-torch twin of :func:`qmatmul`: float64 ``x @ W^T`` with W dequantized
    exactly by :func:`gguflm.dequantize` (itself bit-identical to libggml)."""
    from gguflm.quant import dequantize

    weight = dequantize(w.raw, w.ggml_type, (w.in_features, w.out_features)).double()  # [N, K]
    return x.double() @ weight.T


def dequantize_rows(w: QuantWeight, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (int64, any shape) of W as float32 ``[*rows.shape, K]``, bit-identical
    to libggml's to_float; a row id outside [0, N) is an error."""
    ids = rows.reshape(-1).to(torch.int64).contiguous()
    out = ops().dequantize_rows(w.raw, int(w.ggml_type), w.out_features, w.in_features, ids)
    return out.view(*rows.shape, w.in_features)


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with W kept quantized (:func:`qmatmul`); x, y float32 on the CPU."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)  # [N]

    @property
    def in_features(self) -> int:
        return self.weight.in_features

    @property
    def out_features(self) -> int:
        return self.weight.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        y = qmatmul(x, self.weight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.weight.ggml_type.name}"


class QuantEmbedding:
    """Token embedding rows read from a quantized ``[n_vocab, E]`` table on demand.

    Indexing with a LongTensor of token ids ``[...]`` gives float32 ``[..., E]``, as indexing
    the float table would (``self.embedding[tokens]``), but only the rows asked for are
    dequantized. Shares its bytes with a tied output :class:`QuantLinear`.
    """

    def __init__(self, weight: QuantWeight):
        self.weight = weight

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    def __getitem__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError("QuantEmbedding is indexed by an integer tensor of token ids")
        return dequantize_rows(self.weight, tokens)
