"""Architectures as data: how a GGUF architecture names its tensors and rotates pairs.

llama.cpp decides per architecture (``llama_model_rope_type``) whether RoPE rotates
adjacent pairs ``(x[2i], x[2i+1])`` ("NORM") or halves ``(x[i], x[i + d/2])`` ("NEOX"), and
names every tensor from a template such as ``blk.{bid}.attn_q.weight``. An :class:`ArchSpec`
records exactly that, so a new Llama-like architecture is a table entry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gguflm.errors import GGUFError


class RopeStyle(enum.Enum):
    NORM = "norm"  # rotate (x[2i], x[2i+1]); GGUF Q/K rows are stored permuted for this
    NEOX = "neox"  # rotate (x[i], x[i + n_rot/2])


# Tensor roles of a pre-norm decoder. Global roles are formatted without ``bid``.
GLOBAL_ROLES = ("token_embd", "output_norm", "output", "rope_freqs")
BLOCK_ROLES = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
               "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

_LLAMA_TENSORS = {
    "token_embd": "token_embd.weight",
    "output_norm": "output_norm.weight",
    "output": "output.weight",
    "rope_freqs": "rope_freqs.weight",
    **{role: f"blk.{{bid}}.{role}.weight" for role in BLOCK_ROLES},
}


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF architecture lays out a Llama-like decoder.

    ``tensors`` maps a role to its name template; ``bias_roles`` are linear roles whose
    ``.bias`` tensor is used when present; ``optional`` roles may be absent (``output``
    falls back to ``token_embd`` when ``tied_output_fallback``; ``rope_freqs`` is Llama 3's
    per-frequency divisor).
    """

    name: str
    rope: RopeStyle
    tensors: dict[str, str]
    bias_roles: frozenset[str] = field(default_factory=frozenset)
    optional: frozenset[str] = frozenset({"output", "rope_freqs"})
    tied_output_fallback: bool = True

    def tensor_name(self, role: str, bid: int | None = None) -> str:
        """The GGUF tensor name of ``role`` (in block ``bid`` for block roles)."""
        template = self.tensors[role]
        return template.format(bid=bid) if bid is not None else template

    def bias_name(self, role: str, bid: int) -> str | None:
        """The name of ``role``'s bias in block ``bid``, or None if this arch has none."""
        if role not in self.bias_roles:
            return None
        return self.tensor_name(role, bid).removesuffix(".weight") + ".bias"


ARCHS: dict[str, ArchSpec] = {
    # TinyLlama, SmolLM2, Llama 2, Llama 3.x and Mistral 7B all ship as "llama".
    # llama.cpp loads optional biases for every linear layer of this architecture.
    "llama": ArchSpec("llama", RopeStyle.NORM, _LLAMA_TENSORS, bias_roles=frozenset(LINEAR_ROLES)),
}


def arch_spec(name: str | None) -> ArchSpec:
    """The spec of a GGUF ``general.architecture``; anything else is a GGUFError."""
    if name is None:
        raise GGUFError("missing metadata key 'general.architecture'")
    try:
        return ARCHS[name]
    except KeyError:
        raise GGUFError(f"unsupported architecture {name!r} (supported: {', '.join(sorted(ARCHS))})") from None
