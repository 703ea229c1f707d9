"""Linear layers whose weights come from GGUF tensors.

``linear_from_gguf`` is the one place that decides how a GGUF weight becomes a matmul.
Today every weight is dequantized once, exactly (``gguflm.dequantize``), to float32; a
quantized kernel for a device/type replaces :class:`DequantLinear` here without
touching the model.
"""

from __future__ import annotations

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


def linear_from_gguf(f: GGUFFile, name: str, bias_name: str | None = None,
                     device: torch.device | str = "cpu") -> nn.Module:
    """The linear layer for weight tensor ``name`` (and optional bias tensor)."""
    weight = dequantize_tensor(f, name, device)
    bias = dequantize_tensor(f, bias_name, device) if bias_name else None
    return DequantLinear(weight, bias)
