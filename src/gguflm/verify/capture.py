"""Record the engine's intermediate tensors during one real forward pass.

Uses torch's forward hooks on the modules of :class:`gguflm.model.layers.Transformer`, so
the engine runs unmodified (no second copy of the forward pass, no flag in its code). For
every block it records the residual stream going in and coming out (the logit lens reads
these); for the ``detail`` layers it also records each step's input and output:

    attn_norm.out, wq/wk/wv.out, rope q/k in+out (the input is after the q/k norms where the
    arch has them), wo.in (attention output) + out, attn_post_norm.out (Gemma),
    ffn_norm.in (residual after attention) + out, gate.out, up.out, down.in (the gated
    activation) + out, ffn_post_norm.out (Gemma), the block's output

plus ``output_norm`` in/out and the logits. Tensors are float32 on the CPU, batch row 0,
shapes ``[T, ...]``: residual/norm/linear tensors [T, width], rope tensors [heads, T, D].

Where the engine runs a whole block as one fused kernel (the CPU's ``FusedBlock``), its
steps cannot be observed: the block's input and output are still the real ones, and for
the detail layers the block's plain-torch twin (a :class:`gguflm.model.layers.Block`, which
the wrapper keeps) is run again on that same input to record each step (``Trace.twin_layers``).
The component check then measures the twin's steps and, separately, the fused block's
own output.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Module paths inside one Block: (recorded name, attribute path, what to keep).
_BLOCK_PROBES: tuple[tuple[str, str, str], ...] = (
    ("attn_norm", "attn_norm", "out"),
    ("q", "wq", "out"),
    ("k", "wk", "out"),
    ("v", "wv", "out"),
    ("attn", "wo", "in"),
    ("o", "wo", "out"),
    ("h", "ffn_norm", "in"),
    ("ffn_norm", "ffn_norm", "out"),
    ("gate", "w_gate", "out"),
    ("up", "w_up", "out"),
    ("swiglu", "w_down", "in"),
    ("down", "w_down", "out"),
)
# Probes of modules only some architectures have (Gemma's post norms), kept when present.
_OPTIONAL_PROBES: tuple[tuple[str, str, str], ...] = (
    ("attn_post", "attn_post_norm", "out"),
    ("ffn_post", "ffn_post_norm", "out"),
)


@dataclass
class Trace:
    """What one forward pass of ``tokens`` computed. See the module docstring for names."""

    tokens: list[int]
    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # [T]
    block_in: dict[int, torch.Tensor] = field(default_factory=dict)    # layer -> [T, E]
    block_out: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [T, E]
    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    twin_layers: set[int] = field(default_factory=set)  # detail layers whose steps come from a twin
    output_norm_in: torch.Tensor | None = None    # [T, E]
    output_norm_out: torch.Tensor | None = None   # [T, E]
    logits: torch.Tensor | None = None            # [T, V]


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t.detach()[0].float().cpu().clone()


def _submodule(root: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` under ``root``, also when a wrapper (e.g. the CPU's fused block,
    which keeps the plain block as its child) sits in between."""
    for name, mod in root.named_modules():
        if name == path or name.endswith("." + path):
            return mod
    raise RuntimeError(f"the engine has no module {path!r} to observe; gguflm.verify.capture "
                       "follows gguflm.model.layers and needs updating")


def plain_block(block: nn.Module) -> nn.Module:
    """``block`` if it is a plain :class:`gguflm.model.layers.Block`, else the plain twin a
    fused wrapper keeps as a child (the CPU's ``FusedBlock`` runs a whole block in C++)."""
    from gguflm.model.layers import Block

    if isinstance(block, Block):
        return block
    for mod in block.modules():
        if isinstance(mod, Block):
            return mod
    raise RuntimeError(f"{type(block).__name__} holds no gguflm.model.layers.Block whose steps could be observed")


def trace_forward(model: Any, tokens: Sequence[int], detail: Collection[int]) -> Trace:
    """Run ``model.logits(tokens)`` once and record its intermediates (``detail``: layers
    whose every step is kept). ``model`` is a :class:`gguflm.model.Model`."""
    tr = model.transformer
    trace = Trace(tokens=[int(t) for t in tokens])
    current: dict[str, int] = {"layer": -1, "rope": 0}
    handles: list[Any] = []

    def pre_block(i: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            current["layer"], current["rope"] = i, 0
            trace.block_in[i] = _keep(args[0])
        return hook

    def post_block(i: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            trace.block_out[i] = _keep(out)
            if i in trace.layers and i not in trace.twin_layers:
                trace.layers[i]["out"] = trace.block_out[i]
        return hook

    def probe(i: int, name: str, side: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            trace.layers[i][name] = _keep(args[0] if side == "in" else out)
        return hook

    def rope_hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        i = current["layer"]
        if i in trace.layers:
            which = "q" if current["rope"] == 0 else "k"
            trace.layers[i][f"rope_{which}_in"] = _keep(args[0])    # [H, T, D]
            trace.layers[i][f"rope_{which}_out"] = _keep(out)
            if current["rope"] == 0:
                trace.positions = args[1].detach()[0].cpu().clone()  # [T]
        current["rope"] += 1

    def norm_hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        trace.output_norm_in, trace.output_norm_out = _keep(args[0]), _keep(out)

    def run_twin(twin: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> None:
            current["rope"] = 0
            i = current["layer"]
            trace.layers[i]["out"] = _keep(twin(*args, **kwargs))  # rewrites cache rows nothing reads again
        return hook

    try:
        for i, block in enumerate(tr.blocks):
            handles.append(block.register_forward_pre_hook(pre_block(i)))
            handles.append(block.register_forward_hook(post_block(i)))
            if i in detail:
                trace.layers[i] = {}
                twin = plain_block(block)
                probes = _BLOCK_PROBES + tuple(p for p in _OPTIONAL_PROBES if getattr(twin, p[1], None) is not None)
                for name, path, side in probes:
                    handles.append(_submodule(twin, path).register_forward_hook(probe(i, name, side)))
                if twin is not block:
                    trace.twin_layers.add(i)
                    handles.append(block.register_forward_hook(run_twin(twin), with_kwargs=True))
        handles.append(_submodule(tr, "rope").register_forward_hook(rope_hook))
        handles.append(_submodule(tr, "output_norm").register_forward_hook(norm_hook))
        trace.logits = model.logits(trace.tokens).float()                 # [T, V]
    finally:
        for h in handles:
            h.remove()
    for i, seen in trace.layers.items():
        twin = plain_block(tr.blocks[i])
        want = {name for name, _, _ in _BLOCK_PROBES} | {
            name for name, path, _ in _OPTIONAL_PROBES if getattr(twin, path, None) is not None}
        missing = (want | {"out"}) - set(seen)
        if missing:
            raise RuntimeError(f"layer {i} ran without its modules {sorted(missing)} (a fused path?); "
                               "nothing to compare")
    return trace
