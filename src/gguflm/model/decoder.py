"""The decoder block's composition, written once for every device: fusion-level ops whose
providers are the torch reference (:class:`gguflm.model.layers.TorchOps`), the C++ block
step (:mod:`gguflm.kernels.cpu.block`, which records this composition as a program) and
the CUDA kernels (:class:`gguflm.model.cuda.forward.Rows`, :class:`gguflm.model.cuda.decode.Token`).
The choices that differ between architectures are ArchSpec data carried by the layer's
weights (q/k norms and post norms present or None, ``local``) and the provider's config
(activation, eps)::

    h   = x + attn_post_norm(Wo attention(head_norm(Wqkv attn_norm(x))))
    out = h + ffn_post_norm(Wd (act(Wg ffn_norm(h)) * Wu ffn_norm(h)))

The ops protocol. A provider holds the residual stream ``x`` [N, E] (N rows; the torch
provider keeps them as [B, T, E]) and has, with W the provider's linears and norm weights
its own objects:

* ``norm_linear(norm, lins) -> qkv``: the projections of ``norm(x)`` by ``lins`` (the
  layer's ``qkv``: ``(Wq, Wk, Wv)`` or a stacked one); ``qkv`` is the provider's own value
  (a tuple, one [N, (H + 2 Hkv) D] tensor, ...): only its own ops read it.
* ``head_norm(qkv, q_norm, k_norm) -> qkv``: RMSNorm over each query / key head ([D]
  weights; Qwen3, Gemma 3), before RoPE.
* ``linear_add(a, lin, post)``: ``x += lin(a)``, or ``x += post(lin(a))`` (a post norm).
* ``norm_gated(layer) -> f`` [N, F]: ``act(Wg n) * Wu n``, ``n = layer.ffn_norm(x)``, with
  the layer's ``w_gate`` and ``w_up`` (a provider may read how they are packed).

and ``attention(i, layer, qkv) -> a`` [N, H D], given by the caller: RoPE at the rows'
positions (the layer's table: local layers have their own), this step's keys/values
written into layer ``i`` of the KV cache, causal (or sliding-window, ``layer.local``)
grouped-query attention. It is the one op whose kernels depend on the shape of the step
(one sequence, padded rows, one token per row), so each caller brings its own.

A layer has the attributes ``attn_norm, qkv, q_norm, k_norm, wo, attn_post_norm,
ffn_norm, w_gate, w_up, w_down, ffn_post_norm, local`` (absent parts None).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# attention(layer index, layer, qkv) -> [N, H D] (before Wo)
Attention = Callable[[int, Any, Any], Any]


def block(ops, i: int, layer, attention: Attention) -> None:
    """Block ``i`` over the residual stream ``ops`` holds (see the module docstring)."""
    qkv = ops.norm_linear(layer.attn_norm, layer.qkv)
    if layer.q_norm is not None:
        qkv = ops.head_norm(qkv, layer.q_norm, layer.k_norm)
    ops.linear_add(attention(i, layer, qkv), layer.wo, layer.attn_post_norm)
    ops.linear_add(ops.norm_gated(layer), layer.w_down, layer.ffn_post_norm)


def decoder(layers: Sequence, ops, attention: Attention) -> None:
    """Every block, in order, over the residual stream ``ops`` holds."""
    for i, layer in enumerate(layers):
        block(ops, i, layer, attention)
