"""Build a :class:`Transformer` from a GGUF file: resolve each role's tensor through the
ArchSpec, check its shape against the config, dequantize it once."""

from __future__ import annotations

import torch

from gguflm.errors import GGUFError
from gguflm.gguf.reader import GGUFFile
from gguflm.model.arch import ArchSpec, arch_spec
from gguflm.model.config import ModelConfig
from gguflm.model.layers import Attention, Block, FeedForward, RMSNorm, Rope, Transformer
from gguflm.model.linear import (dequantize_tensor, embedding_from_gguf, fused_block, linear_from_gguf,
                                 tied_embedding)


def expected_shape(role: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The ggml shape (ne0 first) a role's weight must have; a linear's bias is ``(ne1,)``."""
    E, q_out, kv_out = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    return {
        "token_embd": (E, cfg.n_vocab), "output": (E, cfg.n_vocab), "output_norm": (E,),
        "rope_freqs": (cfg.n_rot // 2,), "attn_norm": (E,), "ffn_norm": (E,),
        "attn_q": (E, q_out), "attn_k": (E, kv_out), "attn_v": (E, kv_out), "attn_output": (q_out, E),
        "ffn_gate": (E, cfg.n_ff), "ffn_up": (E, cfg.n_ff), "ffn_down": (cfg.n_ff, E),
    }[role]


class _Weights:
    """Name resolution and checks for one file."""

    def __init__(self, f: GGUFFile, spec: ArchSpec, cfg: ModelConfig, device: torch.device | str):
        self.f, self.spec, self.cfg, self.device = f, spec, cfg, device

    def name(self, role: str, bid: int | None = None) -> str:
        name = self.spec.tensor_name(role, bid)
        info = self.f.tensors.get(name)
        if info is None:
            raise GGUFError(f"missing tensor {name!r}")
        want = expected_shape(role, self.cfg)
        if tuple(info.shape) != want:
            raise GGUFError(f"tensor {name!r} has shape {list(info.shape)}, expected {list(want)}")
        return name

    def dense(self, role: str, bid: int | None = None) -> torch.Tensor:
        return dequantize_tensor(self.f, self.name(role, bid), self.device)

    def linear(self, role: str, bid: int) -> torch.nn.Module:
        name = self.name(role, bid)
        bias = self.spec.bias_name(role, bid)
        if bias is not None and bias in self.f.tensors:
            n_out = expected_shape(role, self.cfg)[1]
            if tuple(self.f.tensors[bias].shape) != (n_out,):
                raise GGUFError(f"tensor {bias!r} has shape {list(self.f.tensors[bias].shape)}, expected [{n_out}]")
        else:
            bias = None
        return linear_from_gguf(self.f, name, bias, self.device)


def build_transformer(f: GGUFFile, cfg: ModelConfig, n_ctx: int,
                      device: torch.device | str = "cpu") -> Transformer:
    """The decoder of ``f`` with RoPE tables for ``n_ctx`` positions, weights on ``device``."""
    spec = arch_spec(cfg.arch)
    w = _Weights(f, spec, cfg, device)
    if cfg.tied_output:  # one copy: the embedding shares the output's weight
        output = w.linear("token_embd", None)
        embedding = tied_embedding(output)
    else:
        output, embedding = w.linear("output", None), embedding_from_gguf(f, w.name("token_embd"), device)
    freq_factors = w.dense("rope_freqs") if cfg.has_rope_freqs else None
    blocks = []
    for bid in range(cfg.n_layer):
        attn = Attention(cfg, *(w.linear(r, bid) for r in ("attn_q", "attn_k", "attn_v", "attn_output")))
        ffn = FeedForward(*(w.linear(r, bid) for r in ("ffn_gate", "ffn_up", "ffn_down")))
        blocks.append(fused_block(Block(RMSNorm(w.dense("attn_norm", bid), cfg.rms_eps), attn,
                                        RMSNorm(w.dense("ffn_norm", bid), cfg.rms_eps), ffn)))
    return Transformer(cfg, embedding, blocks, RMSNorm(w.dense("output_norm"), cfg.rms_eps), output,
                       Rope(cfg, n_ctx, freq_factors.cpu() if freq_factors is not None else None, device))
