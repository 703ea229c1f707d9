"""Linear layers whose weights come from GGUF tensors.

``linear_from_gguf`` is the one place that decides how a GGUF weight becomes a matmul.
On the CPU a weight whose type has a fused kernel stays in its GGUF encoding
(:class:`gguflm.quant.cpu.QuantLinear`; ``embedding_from_gguf`` and ``fused_block`` follow
the same choice); anything else is dequantized once, exactly (``gguflm.dequantize``), to
float32 (:class:`DequantLinear`). ``GGUFLM_CPU_KERNELS=0`` forces that float path.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from gguflm.gguf.reader import GGUFFile


def dequantize_tensor(f: GGUFFile, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Tensor ``name`` of ``f`` as float32, shape ``reversed(info.shape)`` (rows first)."""
    from gguflm.quant import dequantize

    info = f.tensors[name]
    return dequantize(f.tensor_data(name), info.ggml_type, info.shape).to(device)


class DequantLinear(nn.Module):
    """``y = x @ W.T + b`` with W: [out, in] dequantized from the file to float32.

    W is kept transposed, ``weight_t`` [in, out] contiguous: a one-row ``x @ weight_t``
    streams memory faster on CPU than ``F.linear`` against [out, in] (about 1.5x for
    SmolLM2's decode, which is memory-bound).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)  # [in, out]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def cpu_kernel_weight(f: GGUFFile, name: str, device: torch.device | str):
    """Tensor ``name`` kept quantized for the fused CPU kernels (a ``QuantWeight`` over the
    file mapping), or None where they do not apply: another device, a type without a kernel,
    kernels that cannot be built here, or ``GGUFLM_CPU_KERNELS=0``."""
    if torch.device(device).type != "cpu" or os.environ.get("GGUFLM_CPU_KERNELS", "1") == "0":
        return None
    from gguflm.quant import cpu

    info = f.tensors[name]
    if len(info.shape) != 2 or not cpu.supports(info.ggml_type):
        return None
    return cpu.QuantWeight(f.tensor_data(name), info.ggml_type, info.shape)


def linear_from_gguf(f: GGUFFile, name: str, bias_name: str | None = None,
                     device: torch.device | str = "cpu") -> nn.Module:
    """The linear layer for weight tensor ``name`` (and optional bias tensor)."""
    bias = dequantize_tensor(f, bias_name, device) if bias_name else None
    quantized = cpu_kernel_weight(f, name, device)
    if quantized is not None:
        from gguflm.quant.cpu import QuantLinear

        return QuantLinear(quantized, bias)
    return DequantLinear(dequantize_tensor(f, name, device), bias)


def embedding_from_gguf(f: GGUFFile, name: str, device: torch.device | str = "cpu"):
    """The [n_vocab, E] token-embedding table of tensor ``name``, indexed by token ids: the
    quantized table (rows dequantized on lookup) where the CPU kernels apply, else float32."""
    quantized = cpu_kernel_weight(f, name, device)
    if quantized is not None:
        from gguflm.quant.cpu import QuantEmbedding

        return QuantEmbedding(quantized)
    return dequantize_tensor(f, name, device)


def tied_embedding(output: nn.Module):
    """The embedding table that shares the tied output projection's weight (no copy)."""
    if isinstance(output, DequantLinear):
        return output.weight_t.t()
    from gguflm.quant.cpu import QuantEmbedding

    return QuantEmbedding(output.weight)


def fused_block(block: nn.Module) -> nn.Module:
    """``block``, or on the CPU with quantized linears the same block run as one C++ call
    per decode step (:class:`gguflm.quant.cpu.block.FusedBlock`)."""
    from gguflm.quant.cpu.block import FusedBlock

    return FusedBlock(block) if FusedBlock.eligible(block) else block
