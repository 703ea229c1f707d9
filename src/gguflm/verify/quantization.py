"""The Quantization section: every tensor dequantized by gguflm and by libggml, compared
bit for bit; and the weight layout a Llama-family decoder needs, checked on the file.

The layout table below is written from llama.cpp's ``LLM_ARCH_LLAMA`` tensor list (ggml
order, ne0 first), separately from the engine's loader, so a file the engine would wrongly
accept shows up here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from gguflm.gguf.reader import GGUFFile
from gguflm.gguf.types import GGMLType
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


def _libggml_floats(raw: np.ndarray, ggml_type: GGMLType, n: int) -> np.ndarray | None:
    if ggml_type == GGMLType.F32:  # no to_float: the bytes are the floats
        return np.frombuffer(raw, dtype=np.float32)
    if not ggml_oracle.has_to_float(ggml_type):
        return None
    return ggml_oracle.ggml_to_float(raw, ggml_type, n)


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
        theirs = _libggml_floats(raw, info.ggml_type, n) if use_libggml else None
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


_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def check_layout(f: GGUFFile, cfg: ModelConfig, use_libggml: bool) -> list[LayoutCheck]:
    """Shapes and sizes a Llama-family decoder must have (see the module docstring)."""
    E, V, F = cfg.n_embd, cfg.n_vocab, cfg.n_ff
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    # role -> ggml shape (ne0 first) of its weight; a bias is (ne1,)
    block_shapes = {"attn_norm": (E,), "attn_q": (E, q), "attn_k": (E, kv), "attn_v": (E, kv),
                    "attn_output": (q, E), "ffn_norm": (E,), "ffn_gate": (E, F), "ffn_up": (E, F),
                    "ffn_down": (F, E)}
    checks: list[LayoutCheck] = []
    t = f.tensors

    n_tokens = len(f.metadata.get("tokenizer.ggml.tokens", []))
    embd = t.get("token_embd.weight")
    checks.append(LayoutCheck("embedding rows = vocabulary", embd is not None and embd.shape == (E, n_tokens),
                              f"token_embd {list(embd.shape) if embd else None}, {n_tokens} tokens, n_embd {E}"))
    out = t.get("output.weight")
    checks.append(LayoutCheck("output projection", out.shape == (E, V) if out else embd is not None,
                              f"output.weight {list(out.shape)}" if out else "tied: reuses token_embd.weight"))
    checks.append(LayoutCheck("output_norm", t.get("output_norm.weight") is not None
                              and t["output_norm.weight"].shape == (E,), f"[{E}]"))
    checks.append(LayoutCheck("GQA ratio", cfg.n_head % cfg.n_head_kv == 0,
                              f"{cfg.n_head} query heads / {cfg.n_head_kv} KV heads = {cfg.n_head / cfg.n_head_kv:g}, "
                              f"head size {cfg.head_dim}"))

    bad_attn, bad_ffn, missing, unknown = [], [], [], []
    for bid in range(cfg.n_layer):
        for role, shape in block_shapes.items():
            info = t.get(f"blk.{bid}.{role}.weight")
            if info is None:
                missing.append(f"blk.{bid}.{role}.weight")
            elif info.shape != shape:
                (bad_ffn if role.startswith("ffn") else bad_attn).append(
                    f"blk.{bid}.{role}.weight {list(info.shape)} != {list(shape)}")
    for name, info in t.items():
        m = _BLOCK_TENSOR.fullmatch(name)
        if m:
            bid, role, kind = int(m[1]), m[2], m[3]
            ok = bid < cfg.n_layer and role in block_shapes and (
                kind == "weight" or (len(block_shapes[role]) == 2 and info.shape == block_shapes[role][1:]))
        else:
            ok = name in ("token_embd.weight", "output.weight", "output_norm.weight", "rope_freqs.weight")
        if not ok:
            unknown.append(name)
    checks.append(LayoutCheck("attention shapes", not bad_attn,
                              "; ".join(bad_attn[:4]) or f"q [{E}, {q}], k/v [{E}, {kv}], o [{q}, {E}] "
                              f"in {cfg.n_layer} layers"))
    checks.append(LayoutCheck("FFN shapes", not bad_ffn,
                              "; ".join(bad_ffn[:4]) or f"gate/up [{E}, {F}], down [{F}, {E}] in {cfg.n_layer} layers"))
    checks.append(LayoutCheck("every block tensor present", not missing,
                              "; ".join(missing[:4]) or f"{cfg.n_layer} x {len(block_shapes)} tensors"))
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
