"""A model's weights on an NVIDIA GPU, in their GGUF encoding.

Each linear weight becomes a :class:`CudaLinear`: the file's blocks regrouped into field
planes (:class:`PackedWeight`, the file's byte count) when a Triton kernel covers the
type, read by the fused GEMV for one token. Many tokens (prefill, the server's batched
decode step) run the fused dequantize x GEMM (:mod:`gguflm.quant.triton.gemm`: each weight
tile decoded in registers, split-K for narrow weights, batch invariant: a row's bits do
not depend on its batch). Measured on an H200 (TinyLlama-1.1B shape, Q4_K_M, before
split-K): pp512 of a fresh prompt 27.2k tok/s vs 18.9k for dequantization + cuBLAS, peak
torch memory 726 MB vs 1130 MB, decode unchanged; checked there against libggml
(tests/cuda/test_gemm.py). ``GGUFLM_MATMUL=cublas`` selects the former default instead:
each weight dequantized tile by tile into a shared half-precision workspace, then
cuBLAS (a row's bits then depend on its batch); so does a GEMM that fails to compile
here. Types no kernel covers fall back, explicitly, to a float16 copy made once by the
exact torch dequantizer (``fallback`` names them; they run cuBLAS).
Norm weights and biases are small and kept in float32.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from triton.errors import TritonError

from gguflm.gguf.reader import GGUFFile
from gguflm.model.arch import WeightTable
from gguflm.model.config import ModelConfig
from gguflm.quant.triton.codecs import codec
from gguflm.quant.triton.dequant import dequantize_into
from gguflm.quant.triton.gemm import gemm, gemm_config, gemm_gated
from gguflm.quant.cuda.gemv import gemv  # the CUDA C++ kernel where it applies, else Triton
from gguflm.quant.triton.planes import PackedWeight

HALF = torch.float16  # activation / workspace dtype of the many-token path
OUTPUT_ROW_CHUNK = 4096  # rows of the output projection dequantized per many-token matmul (cuBLAS path)


_gemm_failed: list[str] = []  # why the fused GEMM could not run here (said once; cuBLAS from then on)


def fused_gemm() -> bool:
    """Whether many-token matmuls of packed weights run the fused GEMM (the default) or
    dequantize into the workspace for cuBLAS (``GGUFLM_MATMUL=cublas``; also after the
    GEMM failed to compile or launch here, which is said once on stderr)."""
    return not _gemm_failed and os.environ.get("GGUFLM_MATMUL", "gemm") != "cublas"


_one_sequence: ContextVar[bool] = ContextVar("gguflm_one_sequence", default=False)


def _fused_for(rows: int) -> bool:
    """:func:`fused_gemm`, except for a run of one sequence's tokens of at least
    ``GGUFLM_SEQ_CUBLAS_ROWS`` rows (default 64; 0: never), which dequantizes each weight into
    the workspace for cuBLAS: no other rows share those launches (batch invariance is not at
    stake), and a prompt's GEMMs are then 2.7x faster (H200, TinyLlama-1.1B shape Q4_K_M,
    fresh pp512 from its bucket's graph: 96k tok/s vs 36k through the fused GEMM)."""
    if not fused_gemm():
        return False
    limit = int(os.environ.get("GGUFLM_SEQ_CUBLAS_ROWS", "64"))
    return not (limit and rows >= limit and _one_sequence.get())


@contextmanager
def one_sequence():
    """Many-token matmuls of one sequence's run of tokens (``forward_plain``: a prompt
    read alone) take the fused GEMM without split-K: no other rows share the launch, so
    batch invariance across a step's rows is not at stake, and the unsplit kernel is the
    faster one for a prompt (H200, TinyLlama-1.1B shape Q4_K_M, fresh pp512: 27.2k tok/s
    unsplit, 18.8k with the splits; benchmarks/results/2026-12-05-h200-generate*.json).
    Runs of at least ``GGUFLM_SEQ_CUBLAS_ROWS`` tokens take cuBLAS instead (:func:`_fused_for`).
    The batched step's rows (the server) keep the splits, fixed by the weight alone."""
    token = _one_sequence.set(True)
    try:
        yield
    finally:
        _one_sequence.reset(token)


def _config(w: PackedWeight):
    """The GEMM's launch shape for ``w`` here: unsplit inside :func:`one_sequence`, else
    the weight's own (None: :func:`gemm_config`)."""
    return replace(gemm_config(w), splits=1) if _one_sequence.get() else None


def _gemm_failure(e: Exception) -> None:
    _gemm_failed.append(f"{type(e).__name__}: {e}")
    print(f"gguflm: the fused GEMM failed ({_gemm_failed[0][:300]}); many-token matmuls fall back to "
          "dequantization + cuBLAS (not batch invariant)", file=sys.stderr)


class Workspace:
    """One half-precision buffer that every many-token matmul of the cuBLAS path
    dequantizes its weight into, in turn (the stream orders the uses). Sized for the
    largest weight, or a chunk of rows of the output projection; allocated on first use
    (the fused GEMM needs none)."""

    def __init__(self, n_elements: int, device: torch.device):
        self.n_elements, self.device = n_elements, device
        self.buf: torch.Tensor | None = None

    def view(self, n_rows: int, n_cols: int) -> torch.Tensor:
        if self.buf is None:
            self.buf = torch.empty(self.n_elements, dtype=HALF, device=self.device)
        return self.buf[:n_rows * n_cols].view(n_rows, n_cols)


@dataclass
class CudaLinear:
    """``y = x W^T (+ b)`` with W [n_out, n_in] resident as ``packed`` planes, or as the
    float16 ``dense`` fallback when no kernel covers its type."""

    n_out: int
    n_in: int
    packed: PackedWeight | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # float32 [n_out]

    @property
    def nbytes(self) -> int:
        own = self.packed.nbytes if self.packed is not None else self.dense.numel() * self.dense.element_size()
        return own + (self.bias.numel() * 4 if self.bias is not None else 0)

    def gemv(self, x: torch.Tensor, out: torch.Tensor, norm_weight: torch.Tensor | None = None,
             eps: float = 0.0, residual: torch.Tensor | None = None) -> torch.Tensor:
        """One token: x float32 [n_in] -> out float32 [n_out] = (residual +) W x' (+ b),
        x' = RMSNorm(x) * norm_weight when ``norm_weight`` is given; or each of R rows:
        x [R, n_in] -> out [R, n_out] (any row stride)."""
        if self.packed is not None:
            gemv(self.packed, x, out, norm_weight=norm_weight, eps=eps, residual=residual)
        else:
            if norm_weight is not None:
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
            y = F.linear(x.to(HALF), self.dense).float()
            out.copy_(y if residual is None else residual + y)
        if self.bias is not None:
            out += self.bias
        return out

    def matmul(self, x: torch.Tensor, ws: Workspace, row_chunk: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Many tokens: x float16 [T, n_in] -> float16 [T, n_out] (into ``out`` when given:
        any row stride, e.g. a column slice) on the tensor cores, float32 accumulation.
        Packed weights: the fused GEMM, or (``GGUFLM_MATMUL=cublas``) W dequantized into
        ``ws`` ``row_chunk`` rows at a time for cuBLAS."""
        if self.packed is not None and _fused_for(x.shape[0]):
            try:
                return gemm(self.packed, x, out, bias=self.bias, config=_config(self.packed))
            except (RuntimeError, TritonError) as e:  # a failed compilation, too little shared memory
                _gemm_failure(e)
        if self.packed is None:
            y = F.linear(x, self.dense)
        elif row_chunk is None or row_chunk >= self.n_out:
            y = F.linear(x, dequantize_into(self.packed, ws.view(self.n_out, self.n_in)))
        else:
            y = torch.empty(x.shape[0], self.n_out, dtype=HALF, device=x.device)
            ids = torch.arange(self.n_out, dtype=torch.int32, device=x.device)
            for r0 in range(0, self.n_out, row_chunk):
                r1 = min(r0 + row_chunk, self.n_out)
                w = dequantize_into(self.packed, ws.view(r1 - r0, self.n_in), rows=ids[r0:r1])
                torch.matmul(x, w.T, out=y[:, r0:r1])
        if self.bias is not None:
            y = y + self.bias.to(HALF)
        return y if out is None else out.copy_(y)

    def rows(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """W[ids]: the embedding lookup, ids int [n] on the device -> float32 [n, n_in]
        (into ``out`` when given)."""
        if out is None:
            out = torch.empty(ids.numel(), self.n_in, dtype=torch.float32, device=ids.device)
        if self.packed is None:
            return out.copy_(self.dense[ids])
        return dequantize_into(self.packed, out, rows=ids if ids.dtype in (torch.int32, torch.int64) else ids.long())


def stacked(parts: tuple[CudaLinear, ...]) -> tuple[CudaLinear, ...]:
    """``(W,)`` with ``W = [W_a; W_b; ...]`` when all parts are packed in one type without
    bias (the fused QKV projection), else the parts unchanged."""
    if any(p.packed is None or p.bias is not None for p in parts):
        return parts
    if len({p.packed.ggml_type for p in parts}) != 1:
        return parts
    packed = PackedWeight.stack([p.packed for p in parts])
    return (CudaLinear(packed.n_rows, packed.n_cols, packed),)


def qkv_matmul(qkv: tuple[CudaLinear, ...], h: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """h float16 [N, E] -> float16 [N, sum of n_out]: the fused [Wq; Wk; Wv], or each part
    written into its columns of one buffer."""
    if len(qkv) == 1:
        return qkv[0].matmul(h, ws)
    out = torch.empty(h.shape[0], sum(lin.n_out for lin in qkv), dtype=HALF, device=h.device)
    start = 0
    for lin in qkv:
        lin.matmul(h, ws, out=out[:, start:start + lin.n_out])
        start += lin.n_out
    return out


def gated_matmul(gate: CudaLinear, up: CudaLinear, h: torch.Tensor, packed: bool, gelu: bool) -> torch.Tensor | None:
    """act(h Wg^T) * (h Wu^T), float16 [N, n_ff] (act SiLU, or GELU-tanh with ``gelu``), from
    one GEMM over both weights when ``packed`` (gate and up packed in one type, no bias)
    and the fused GEMM is on; else None (the caller multiplies two matmuls)."""
    if packed and _fused_for(h.shape[0]):
        try:
            return gemm_gated(gate.packed, up.packed, h, gelu=gelu, config=_config(gate.packed))
        except (RuntimeError, TritonError) as e:
            _gemm_failure(e)
    return None


def place(lin: CudaLinear, device: torch.device) -> CudaLinear:
    """Move a CPU-packed weight to the device (one copy of exactly its bytes)."""
    if lin.packed is not None and lin.packed.planes.device != device:
        lin.packed = lin.packed.to(device)
    return lin


@dataclass
class CudaLayer:
    """One block's weights. ``qkv`` is the fused ``[Wq; Wk; Wv]`` when the three stack
    (:func:`stacked`), else ``(Wq, Wk, Wv)``; ``gate_up_packed``: gate and up are packed in
    one type without bias, so one kernel reads both. The arch's optional parts (ArchSpec):
    ``q_norm``/``k_norm`` (Qwen3, Gemma 3), ``attn_post_norm``/``ffn_post_norm`` (Gemma),
    ``local``: a sliding-window layer with its own RoPE table (Gemma 3)."""

    attn_norm: torch.Tensor
    qkv: tuple[CudaLinear, ...]
    wo: CudaLinear
    ffn_norm: torch.Tensor
    w_gate: CudaLinear
    w_up: CudaLinear
    w_down: CudaLinear
    gate_up_packed: bool = False
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    attn_post_norm: torch.Tensor | None = None
    ffn_post_norm: torch.Tensor | None = None
    local: bool = False

    def linears(self) -> tuple[CudaLinear, ...]:
        return (*self.qkv, self.wo, self.w_gate, self.w_up, self.w_down)


@dataclass
class CudaWeights:
    token_embd: CudaLinear
    layers: list[CudaLayer]
    output_norm: torch.Tensor
    output: CudaLinear
    rope_freqs: torch.Tensor | None
    workspace: Workspace
    fallback: dict[str, str] = field(default_factory=dict)  # tensor name -> its type, dequantized to float16

    @property
    def nbytes(self) -> int:
        """Bytes of every linear weight (and bias) on the device, a tied one counted once."""
        lins = {id(lin): lin for lin in [self.token_embd, self.output]
                + [lin for layer in self.layers for lin in layer.linears()]}
        return sum(lin.nbytes for lin in lins.values())


def workspace_elements(layers: list[CudaLayer], output: CudaLinear) -> int:
    """Half-precision elements the many-token path dequantizes into at once: the largest
    packed layer weight, or OUTPUT_ROW_CHUNK rows of the output projection."""
    sizes = [lin.n_out * lin.n_in for layer in layers for lin in layer.linears() if lin.packed is not None]
    return max(sizes + [min(OUTPUT_ROW_CHUNK, output.n_out) * output.n_in])


def load_weights(f: GGUFFile, cfg: ModelConfig, device: torch.device, n_ctx: int | None = None) -> CudaWeights:
    """Every tensor the decoder uses, resolved and checked by the :class:`WeightTable`
    (a row range of a fused tensor included) and moved to ``device``."""
    w = WeightTable(f, cfg)
    fallback: dict[str, str] = {}

    def linear(role: str, bid: int | None = None) -> CudaLinear:
        slot = w.slot(role, bid)
        n_in, n_out = slot.shape
        bias = w.bias(role, bid, device)
        ggml_type = w.ggml_type(role, bid)
        if codec(ggml_type) is not None:  # the file's bytes uploaded as they are, regrouped on the device
            packed = PackedWeight.from_raw(w.raw(role, bid), ggml_type, slot.shape, device)
            return CudaLinear(n_out, n_in, packed=packed, bias=bias)
        fallback[slot.name] = ggml_type.name
        return CudaLinear(n_out, n_in, dense=w.dense(role, bid, device).to(HALF), bias=bias)

    def norm(role: str, bid: int) -> torch.Tensor | None:
        return w.dense(role, bid, device) if w.has(role, bid) else None

    layers = []
    for bid in range(cfg.n_layer):
        qkv = stacked((linear("attn_q", bid), linear("attn_k", bid), linear("attn_v", bid)))
        g, u = linear("ffn_gate", bid), linear("ffn_up", bid)
        layer = CudaLayer(
            attn_norm=w.dense("attn_norm", bid, device),
            qkv=tuple(place(lin, device) for lin in qkv),
            wo=place(linear("attn_output", bid), device),
            ffn_norm=w.dense("ffn_norm", bid, device),
            w_gate=place(g, device), w_up=place(u, device), w_down=place(linear("ffn_down", bid), device),
            gate_up_packed=(g.packed is not None and u.packed is not None and g.bias is None and u.bias is None
                            and g.packed.ggml_type == u.packed.ggml_type),
            q_norm=norm("attn_q_norm", bid), k_norm=norm("attn_k_norm", bid),
            attn_post_norm=norm("attn_post_norm", bid), ffn_post_norm=norm("ffn_post_norm", bid),
            local=cfg.is_swa(bid))
        layers.append(layer)
    token_embd = place(linear("token_embd"), device)
    output = token_embd if cfg.tied_output else place(linear("output"), device)
    rope_freqs = w.rope_factors(n_ctx)  # Llama 3's rope_freqs or Phi-3's factors for n_ctx
    return CudaWeights(token_embd, layers, w.dense("output_norm", None, device), output, rope_freqs,
                       Workspace(workspace_elements(layers, output), device), fallback)
