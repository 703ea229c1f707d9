"""A whole decoder block in one C++ call on the CPU: the C++ provider of the ops of
:mod:`gguflm.model.decoder`.

In a decode step every matrix product is a few microseconds of work on a small model, so
the ~40 torch ops of an eager block (norms, RoPE, cache writes, softmax, activation,
residuals) and their Python dispatch cost as much as the products themselves; in a
prefill the same ops each stream a [T, E] tensor through memory. :class:`FusedBlock`
wraps the model's block (``gguflm.model.layers.Block``, which stays the plain-torch twin)
and runs ``torch.ops.gguflm_cpu.block_step``, an interpreter of the block's *program*:
the decoder's composition (``block.compose``, i.e. :func:`gguflm.model.decoder.block`)
recorded once at load by :class:`Program`, a provider of its ops that turns each call
into an op code and its operand slots (which norm, which weights, which value). So the
order of the ops and the choices the architecture made (q/k norms, post norms, the
activation: the ArchSpec data the loader built the block from) come from the one written
composition, and the C++ code holds only the ops (:data:`OPS`, as the decoder's protocol
defines them), with the RMSNorms ``x / sqrt(mean(x^2) + eps) * w``, the quantized
products of :mod:`gguflm.quant.cpu` (fused GEMVs for a few rows, exact float tiles into
sgemm for many), act one of :data:`ACTIVATIONS`, RoPE from the model's cos/sin table
(NORM or NEOX pairs; a local layer's own table), this step's keys/values written into
the model's KV cache (through its block table: a paged cache) before attention, and
causal grouped-query attention (query head h reads KV head ``h // (H / Hkv)``, keys at
positions ``0..p``, or ``p - window + 1..p`` on a local layer, scores scaled by the
block's scale; a one-sequence prefill uses ATen's fused SDPA kernel). Decode-sized steps run under the adaptive thread cap of
:mod:`gguflm.kernels.cpu.threads`.

What the provider cannot compute it refuses at load (:meth:`FusedBlock.unsupported` says
why: an op :class:`Program` lacks, an activation or norm kind outside its tables; the
loader logs it and keeps the torch block), never computing something else. At run time
only another dtype or device falls back to the twin. The block is read duck-typed
(attribute names of ``gguflm.model.layers``), so this module does not import the model
package that builds on it.
"""

from __future__ import annotations

import torch
from torch import nn

from gguflm.kernels.cpu.threads import governor
from gguflm.quant.cpu import QuantLinear
from gguflm.quant.cpu.build import ops

GOVERNED_ROWS = 64  # steps of at most this many rows (decode, the server's batches) get the adaptive thread cap

_ROLES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # block_step's weight order
_NORMS = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "attn_post_norm", "ffn_post_norm")  # its norm order
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # the gated activations block_step computes (NORM_GATED's ``c``)
NORMS = frozenset({"rms_norm"})            # the norm kinds it computes (a norm module's ``op``)
OPS = ("norm_linear", "head_norm", "attention", "linear_add", "norm_gated")  # block_step's op codes
REGISTERS = 8                              # the values a program may hold (block_step's kRegs)


def _linears(block: nn.Module) -> list:
    return [getattr(block, name) for name in _ROLES]


def _norms(block: nn.Module) -> list:
    return [getattr(block, name) for name in _NORMS]


class Program:
    """The ops of :mod:`gguflm.model.decoder` that record each call as one block_step
    instruction, ``[op, dst, src, norm, a, b, c]`` (-1 where unused): ``op`` an index into
    :data:`OPS`; ``dst``/``src`` registers (values: q, k, v; an attention output; a gated
    activation), each read once; ``norm`` a slot of block_step's norm list; ``a, b, c``
    slots of its weight list (NORM_GATED's ``c``: the activation; HEAD_NORM's ``a``: the
    k norm). A part of the block that is not in those lists, or an op this class lacks,
    raises: the block is not the provider's to run."""

    def __init__(self, block: nn.Module):
        self.code: list[int] = []
        self._norms = {id(n): i for i, n in enumerate(_norms(block)) if n is not None}
        self._weights = {id(m): i for i, m in enumerate(_linears(block))}
        self._live: set[int] = set()
        self._n = 0
        block.compose(self, 0, self.attention)
        if self._n > REGISTERS:
            raise ValueError(f"a program of {self._n} values (block_step holds {REGISTERS})")

    def _emit(self, op: str, src: int = -1, norm: int = -1, a: int = -1, b: int = -1, c: int = -1,
              out: bool = True) -> int:
        if src >= 0:
            self._live.remove(src)  # a value is read once (block_step frees it)
        dst = -1
        if out:
            dst, self._n = self._n, self._n + 1
            self._live.add(dst)
        self.code += [OPS.index(op), dst, src, norm, a, b, c]
        return dst

    def _norm(self, n: nn.Module | None, optional: bool = False) -> int:
        if n is None and optional:
            return -1
        if n is None or id(n) not in self._norms:
            raise ValueError("a norm outside the block's norm slots")
        return self._norms[id(n)]

    def norm_linear(self, norm: nn.Module, lins: tuple) -> int:
        return self._emit("norm_linear", norm=self._norm(norm), **dict(zip("abc", (self._weights[id(m)] for m in lins))))

    def head_norm(self, qkv: int, q_norm: nn.Module, k_norm: nn.Module) -> int:
        return self._emit("head_norm", qkv, self._norm(q_norm), self._norm(k_norm))

    def attention(self, i: int, layer: nn.Module, qkv: int) -> int:
        return self._emit("attention", qkv)

    def linear_add(self, a: int, lin: nn.Module, post: nn.Module | None) -> None:
        self._emit("linear_add", a, self._norm(post, optional=True), self._weights[id(lin)], out=False)

    def norm_gated(self, layer: nn.Module) -> int:
        return self._emit("norm_gated", norm=self._norm(layer.ffn_norm), a=self._weights[id(layer.w_gate)],
                          b=self._weights[id(layer.w_up)], c=ACTIVATIONS[layer.activation.value])


class FusedBlock(nn.Module):
    """``block`` with its forward done in one C++ call (see the module doc)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        why = self.unsupported(block)
        if why is not None:
            raise TypeError(f"the C++ block step cannot run this block: {why}")
        self.block = block
        linears, norms = _linears(block), _norms(block)
        self.n_head, self.n_head_kv, self.head_dim = block.n_head, block.n_head_kv, block.head_dim
        self.n_ff = block.w_gate.out_features
        self.eps = float(block.attn_norm.eps)
        self.program = torch.tensor(Program(block).code, dtype=torch.long)  # block_step's program
        self.scale, self.local, self.window = float(block.scale), bool(block.local), int(block.window)
        self._weights = [m.weight.raw for m in linears]
        self._types = [int(m.weight.ggml_type) for m in linears]
        self._biases = [m.bias for m in linears]
        self._norms = [None if n is None else n.weight for n in norms]
        self._rope: tuple = (None, None)  # (rope module, its block_step arguments), read once
        # Blocks of one shape (a model's layers) share the thread governor's timing state.
        self._key = (self.n_head, self.n_head_kv, self.head_dim, self.n_ff)

    @staticmethod
    def unsupported(block: nn.Module) -> str | None:
        """Why block_step cannot compute ``block`` exactly (None: it can). It computes the
        composition of the module doc from: seven :class:`QuantLinear` (biases allowed),
        norms whose ``op`` is in :data:`NORMS` sharing one eps, a gated activation in
        :data:`ACTIVATIONS`, grouped-query heads, any score scale and sliding window, and a
        composition that :class:`Program` can record."""
        try:
            linears, norms = _linears(block), _norms(block)
            act = block.activation.value
            n_head, n_head_kv, head_dim = block.n_head, block.n_head_kv, block.head_dim
            _ = block.scale, block.local, block.window  # read by the constructor
        except AttributeError as e:
            return f"not a decoder block of gguflm.model.layers ({e})"
        if not all(isinstance(m, QuantLinear) for m in linears):
            return "its linears are not all quantized weights of the CPU kernels"
        if act not in ACTIVATIONS:
            return f"no {act!r} activation (it has {', '.join(ACTIVATIONS)})"
        present = [n for n in norms if n is not None]  # which ones the block needs: Program
        kinds = {getattr(n, "op", type(n).__name__) for n in present}
        if not kinds <= NORMS:
            return f"no {', '.join(sorted(kinds - NORMS))} norm (it has {', '.join(sorted(NORMS))})"
        if len({float(n.eps) for n in present}) != 1:
            return "its norms do not share one eps"
        if n_head % n_head_kv or head_dim % 2:
            return f"{n_head} query heads over {n_head_kv} KV heads of size {head_dim}"
        try:
            Program(block)
        except AttributeError as e:
            return f"its composition calls an op block_step lacks ({e})"
        except (KeyError, ValueError) as e:
            return f"its composition does not fit block_step's ops ({e!r})"
        return None

    def forward(self, x: torch.Tensor, rope: nn.Module, positions: torch.Tensor, blocked: torch.Tensor,
                cache, layer: int, slots: torch.Tensor) -> torch.Tensor:
        # x: [B, T, E]; positions: [B, T] (< 0 = padding); slots: [B] -> [B, T, E]
        if self._rope[0] is not rope:
            table = (rope.cos_swa, rope.sin_swa) if self.local else (rope.cos, rope.sin)
            self._rope = (rope, (*table, rope.style.value == "neox"))
        cos, sin, neox = self._rope[1]
        if x.dtype != torch.float32 or cache.k.dtype != torch.float32 or x.device.type != "cpu":
            return self.block(x, rope, positions, blocked, cache, layer, slots)
        gov = governor()
        rows = x.shape[0] * x.shape[1]
        if gov is not None:
            if rows > GOVERNED_ROWS:
                gov.release()
            else:
                gov.step((self._key, rows), layer)
        return ops().block_step(x.contiguous(), positions.contiguous(), slots, cache.k, cache.v, cache.table, layer,
                                cos, sin, self.program,
                                self._norms, self.eps, self._weights, self._types, self._biases, self.n_head,
                                self.n_head_kv, self.n_ff, neox, self.scale, self.window)
