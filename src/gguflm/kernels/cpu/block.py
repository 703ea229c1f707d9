"""A whole decoder block in one C++ call, for the decode step on the CPU.

In a decode step every matrix product is a few microseconds of work on a 135M model, so
the ~40 torch ops of an eager Llama block (norms, RoPE, cache writes, softmax, SiLU,
residuals) and their Python dispatch cost as much as the products themselves; in a
prefill the same ops each stream a [T, E] tensor through memory. Decode-sized steps run
under the adaptive thread cap of :mod:`gguflm.kernels.cpu.threads` (one thread while
another process keeps a core busy). :class:`FusedBlock` wraps
the model's block and runs ``torch.ops.gguflm_cpu.block_step``, which computes

    h   = x + Wo . attn(rope(Wq . n1(x)), rope(Wk . n1(x)), Wv . n1(x))
    out = h + Wd . (silu(Wg . n2(h)) * (Wu . n2(h)))

with n1, n2 the RMSNorms ``x / sqrt(mean(x^2) + eps) * w``, the quantized products of
:mod:`gguflm.quant.cpu` (fused GEMVs for a few rows, exact float tiles into sgemm for
many), RoPE from the model's own cos/sin table (NORM or NEOX pairs), this step's
keys/values written into the model's KV cache before attention, and causal grouped-query
attention (query head h reads KV head ``h // (H / Hkv)``, keys at positions ``0..p``,
scores scaled by ``D^-1/2``; a one-sequence prefill uses ATen's fused SDPA kernel). That is
the block's own definition (``gguflm.model.layers.Block``), which stays the plain-torch
twin, and runs whatever the C++ does not cover (another dtype or device).

The block is read duck-typed (attribute names of ``gguflm.model.layers``), so this module
does not import the model package that builds on it.
"""

from __future__ import annotations

import torch
from torch import nn

from gguflm.kernels.cpu.threads import governor
from gguflm.quant.cpu import QuantLinear
from gguflm.quant.cpu.build import ops

GOVERNED_ROWS = 64  # steps of at most this many rows (decode, the server's batches) get the adaptive thread cap

_ROLES = (("attn", "wq"), ("attn", "wk"), ("attn", "wv"), ("attn", "wo"),
          ("ffn", "gate"), ("ffn", "up"), ("ffn", "down"))  # block_step's weight order


class FusedBlock(nn.Module):
    """``block`` (a Llama pre-norm block whose seven linears are :class:`QuantLinear`) with
    its forward done in one C++ call when the step has few rows; see the module doc."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        linears = [getattr(getattr(block, part), name) for part, name in _ROLES]
        if not all(isinstance(m, QuantLinear) for m in linears):
            raise TypeError("FusedBlock needs every linear of the block to be a QuantLinear")
        attn = block.attn
        self.n_head, self.n_head_kv, self.head_dim = attn.n_head, attn.n_head_kv, attn.head_dim
        self.n_ff = block.ffn.gate.out_features
        self.eps = float(block.attn_norm.eps)
        if float(block.ffn_norm.eps) != self.eps:
            raise ValueError("the two norms of a block must share eps")
        self._weights = [m.weight.raw for m in linears]
        self._types = [int(m.weight.ggml_type) for m in linears]
        self._biases = [m.bias for m in linears]
        self._norms = (block.attn_norm.weight, block.ffn_norm.weight)
        self._rope: tuple = (None, None)  # (rope module, its block_step arguments), read once
        # Blocks of one shape (a model's layers) share the thread governor's timing state.
        self._key = (self.n_head, self.n_head_kv, self.head_dim, self.n_ff)

    @staticmethod
    def eligible(block: nn.Module) -> bool:
        """True when ``block`` is exactly what block_step computes: the Llama block's parts
        with quantized linears (biases allowed), SiLU gating, no post norms, no q/k norms,
        no sliding window, scores scaled by D^-1/2 (RoPE NORM or NEOX). Any other
        architecture's choices (Gemma's GELU and extra norms, Qwen3's q/k norms, ...) keep
        the torch block."""
        try:
            attn = block.attn
            return (all(isinstance(getattr(getattr(block, part), name), QuantLinear) for part, name in _ROLES)
                    and attn.n_head % attn.n_head_kv == 0
                    and getattr(block.ffn, "activation", None) is not None and block.ffn.activation.value == "silu"
                    and block.attn_post_norm is None and block.ffn_post_norm is None
                    and attn.q_norm is None and attn.k_norm is None and not attn.local
                    and attn.scale == attn.head_dim ** -0.5)
        except AttributeError:
            return False

    def forward(self, x: torch.Tensor, rope: nn.Module, positions: torch.Tensor, blocked: torch.Tensor,
                cache, layer: int, slots: torch.Tensor) -> torch.Tensor:
        # x: [B, T, E]; positions: [B, T] (< 0 = padding); slots: [B] -> [B, T, E]
        if self._rope[0] is not rope:
            self._rope = (rope, (rope.cos, rope.sin, rope.style.value == "neox"))
        cos, sin, neox = self._rope[1]
        if (x.dtype != torch.float32 or cache.k.dtype != torch.float32 or cos.shape[1] * 2 != self.head_dim
                or x.device.type != "cpu"):
            return self.block(x, rope, positions, blocked, cache, layer, slots)
        gov = governor()
        rows = x.shape[0] * x.shape[1]
        if gov is None:
            return self._step(x, positions, slots, cache, layer, cos, sin, neox)
        if rows > GOVERNED_ROWS:
            gov.release()
            return self._step(x, positions, slots, cache, layer, cos, sin, neox)
        gov.step((self._key, rows), layer)
        return self._step(x, positions, slots, cache, layer, cos, sin, neox)

    def _step(self, x, positions, slots, cache, layer, cos, sin, neox):
        return ops().block_step(x.contiguous(), positions.contiguous(), slots, cache.k, cache.v, layer, cos, sin,
                                *self._norms, self.eps, self._weights, self._types, self._biases, self.n_head,
                                self.n_head_kv, self.n_ff, neox)
