"""The Quantization section: every tensor dequantized by gguflm and by libggml, compared
bit for bit; and the weight layout the architecture's decoder needs, checked on the file
through the same weight resolver the engine loads with (``WeightTable``), plus the
vocabulary, unexpected tensors and libggml's byte sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gguflm.errors import GGUFError
from gguflm.gguf.reader import GGUFFile
from gguflm.model.arch import WeightTable
from gguflm.model.config import ModelConfig
from gguflm.verify import ggml_oracle


@dataclass
class TypeSummary:
    """Tensors of one GGML type."""

    tensors: int = 0
    elements: int = 0
    nbytes: int = 0
    compared: int = 0          # tensors libggml could dequantize
    bit_exact: int = 0
    max_abs_diff: float = 0.0  # over compared tensors that are not bit-exact (NaN-aware)
    mismatched: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.elements if self.elements else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"tensors": self.tensors, "elements": self.elements, "bytes": self.nbytes,
                "bits_per_weight": self.bits_per_weight, "compared": self.compared,
                "bit_exact": self.bit_exact, "max_abs_diff": self.max_abs_diff, "mismatched": self.mismatched}


def compare_dequantization(f: GGUFFile, use_libggml: bool) -> dict[str, TypeSummary]:
    """Per GGML type: tensor counts and sizes; when ``use_libggml``, every tensor libggml can
    dequantize is dequantized by :func:`gguflm.dequantize` and by libggml's ``to_float`` and
    compared bit for bit (bit-exact count, the worst difference)."""
    from gguflm.quant import dequantize

    out: dict[str, TypeSummary] = {}
    for name, info in f.tensors.items():
        s = out.setdefault(info.ggml_type.name, TypeSummary())
        n = info.n_elements
        s.tensors, s.elements, s.nbytes = s.tensors + 1, s.elements + n, s.nbytes + info.nbytes
        raw = f.tensor_data(name)
        theirs = ggml_oracle.ggml_to_float(raw, info.ggml_type, n) \
            if use_libggml and ggml_oracle.has_to_float(info.ggml_type) else None
        if theirs is not None:
            ours = dequantize(raw, info.ggml_type, info.shape).numpy().reshape(-1)
            s.compared += 1
            if np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)):
                s.bit_exact += 1
            else:
                s.mismatched.append(name)
                both_nan = np.isnan(ours) & np.isnan(theirs)
                d = np.where(both_nan, 0.0, np.abs(ours.astype(np.float64) - theirs.astype(np.float64)))
                s.max_abs_diff = max(s.max_abs_diff, float(np.nan_to_num(d, nan=np.inf).max()))
    return out


@dataclass(frozen=True)
class LayoutCheck:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


def check_layout(f: GGUFFile, cfg: ModelConfig, use_libggml: bool) -> list[LayoutCheck]:
    """Shapes and sizes the architecture's decoder needs, from the one weight resolver
    (:class:`gguflm.model.arch.WeightTable`: every role's tensor, shape, rows of fused
    tensors and bias), plus what the resolver leaves aside: the vocabulary, tensors no role
    reads, byte sizes by libggml's type traits."""
    E = cfg.n_embd
    checks: list[LayoutCheck] = []
    t = f.tensors
    n_tokens = len(f.metadata.get("tokenizer.ggml.tokens", []))
    embd = t.get("token_embd.weight")
    checks.append(LayoutCheck("embedding rows = vocabulary", embd is not None and embd.shape == (E, n_tokens),
                              f"token_embd {list(embd.shape) if embd else None}, {n_tokens} tokens, n_embd {E}"))
    checks.append(LayoutCheck("GQA ratio", cfg.n_head % cfg.n_head_kv == 0,
                              f"{cfg.n_head} query heads / {cfg.n_head_kv} KV heads = {cfg.n_head / cfg.n_head_kv:g}, "
                              f"head size {cfg.head_dim}"))
    try:
        table = WeightTable(f, cfg)
    except GGUFError as e:
        checks.append(LayoutCheck(f"every {cfg.arch} tensor present with its shape", False, str(e)))
        return checks
    spec = table.spec
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    fused = [w for w, on in (("QKV", spec.fused_qkv), ("gate+up", spec.fused_gate_up)) if on]
    checks.append(LayoutCheck("output projection", True, "tied: reuses token_embd.weight" if cfg.tied_output
                              else f"output.weight {list(table.slot('output').shape)}"))
    checks.append(LayoutCheck(f"every {cfg.arch} tensor present with its shape", True,
                              f"q [{E}, {q}], k/v [{E}, {kv}], o [{q}, {E}], gate/up [{E}, {cfg.n_ff}], "
                              f"down [{cfg.n_ff}, {E}], norms {', '.join(spec.block_norm_roles())} in "
                              f"{cfg.n_layer} layers" + (f"; fused {', '.join(fused)}" if fused else "")))
    unknown = table.unused()
    checks.append(LayoutCheck("no unexpected tensors", not unknown, "; ".join(unknown[:4]) or f"{len(t)} tensors"))
    if use_libggml:
        wrong = []
        for name, info in t.items():
            _, blck, tsize = ggml_oracle.type_traits(info.ggml_type)
            n = info.n_elements
            if n % blck or n // blck * tsize != info.nbytes:
                wrong.append(f"{name}: {info.nbytes} bytes for {n} {info.ggml_type.name}")
        checks.append(LayoutCheck("byte sizes agree with libggml's type traits", not wrong,
                                  "; ".join(wrong[:4]) or f"{len(t)} tensors"))
    return checks
