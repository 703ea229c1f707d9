"""Linear layers whose weights come from GGUF tensors.

``linear_from_table`` is the one place that decides how a GGUF weight (resolved by the
:class:`gguflm.model.arch.WeightTable`) becomes a matmul. On the CPU a weight whose type
has a fused kernel stays in its GGUF encoding
(:class:`gguflm.quant.cpu.QuantLinear`; ``embedding_from_table`` and ``fused_block`` follow
the same choice); anything else is dequantized once, exactly (``gguflm.dequantize``), to
float32 (:class:`DequantLinear`). ``GGUFLM_CPU_KERNELS=0`` forces that float path.
"""

from __future__ import annotations

import os

import torch
from torch import nn


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


def _quantized(raw, ggml_type, shape, device: torch.device | str):
    """A ``QuantWeight`` over ``raw`` for the fused CPU kernels, or None where they do not apply."""
    if torch.device(device).type != "cpu" or os.environ.get("GGUFLM_CPU_KERNELS", "1") == "0":
        return None
    from gguflm.quant import cpu

    if len(shape) != 2 or not cpu.supports(ggml_type):
        return None
    return cpu.QuantWeight(raw, ggml_type, shape)


def linear_from_table(w, role: str, bid: int | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """The linear layer of ``role`` (in block ``bid``) resolved by a
    :class:`gguflm.model.arch.WeightTable` ``w`` (a row range of a fused tensor included)."""
    bias = w.bias(role, bid, device)
    slot = w.slot(role, bid)
    quantized = _quantized(w.raw(role, bid), w.ggml_type(role, bid), slot.shape, device)
    if quantized is not None:
        from gguflm.quant.cpu import QuantLinear

        return QuantLinear(quantized, bias)
    return DequantLinear(w.dense(role, bid, device), bias)


def embedding_from_table(w, role: str, device: torch.device | str = "cpu"):
    """The [n_vocab, E] table of ``role`` indexed by token ids: the quantized table
    (rows dequantized on lookup) where the CPU kernels apply, else float32."""
    quantized = _quantized(w.raw(role), w.ggml_type(role), w.slot(role).shape, device)
    if quantized is not None:
        from gguflm.quant.cpu import QuantEmbedding

        return QuantEmbedding(quantized)
    return w.dense(role, None, device)


def tied_embedding(output: nn.Module):
    """The embedding table that shares the tied output projection's weight (no copy)."""
    if isinstance(output, DequantLinear):
        return output.weight_t.t()
    from gguflm.quant.cpu import QuantEmbedding

    return QuantEmbedding(output.weight)


def fused_block(block: nn.Module) -> tuple[nn.Module, str | None]:
    """``(block run as one C++ call per step, None)`` on the CPU with quantized linears
    (:class:`gguflm.kernels.cpu.block.FusedBlock`); ``(block, None)`` on the float path;
    ``(block, why)`` where the C++ step lacks one of the block's ops (the caller says so)."""
    from gguflm.quant.cpu import QuantLinear

    if not isinstance(block.w_down, QuantLinear):
        return block, None
    from gguflm.kernels.cpu.block import FusedBlock

    why = FusedBlock.unsupported(block)
    return (block, why) if why is not None else (FusedBlock(block), None)
