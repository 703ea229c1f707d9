"""Token investigation: what the model predicts at one position, and when it decides.

The *logit lens* applies the final norm and the LM head to the residual stream after each
block (and to the embedding), as if the model stopped there:

    p_l = softmax( rms(x_l) * w_output_norm  W_out^T )      x_l: residual after block l

computed in float64 from the engine's captured float32 residuals. The last row equals the
model's own prediction; earlier rows show in which layer the token rises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gguflm.verify.components import linear64, rms_norm64


@dataclass(frozen=True)
class TopToken:
    token: int
    logit: float
    prob: float


def top_k(logits: torch.Tensor, k: int) -> list[TopToken]:
    """The ``k`` most probable tokens of one row of logits [V] (softmax in float64)."""
    row = logits.to(torch.float64)
    probs = torch.softmax(row, dim=-1)
    p, idx = probs.topk(min(k, row.numel()))
    return [TopToken(int(i), float(row[i]), float(q)) for q, i in zip(p, idx)]


def rank_of(logits: torch.Tensor, token: int) -> int:
    """1-based rank of ``token`` in a row of logits [V] (ties counted in its favour)."""
    return int((logits > logits[token]).sum()) + 1


@dataclass(frozen=True)
class LensRow:
    """The lens at one depth: ``layer`` -1 is the embedding, l the output of block l."""

    layer: int
    rank: int          # of the investigated token
    prob: float        # of the investigated token
    top_token: int
    top_prob: float
    probs: list[float]  # of the ``watch`` tokens, in their order


def logit_lens(residuals: Sequence[torch.Tensor], norm_w: torch.Tensor, w_out: torch.Tensor, eps: float,
               token: int, watch: Sequence[int]) -> list[LensRow]:
    """One :class:`LensRow` per residual [E] in ``residuals`` (embedding first, then each
    block's output); ``norm_w`` [E] and ``w_out`` [V, E] float64."""
    x = torch.stack([r.to(torch.float64) for r in residuals])                  # [L+1, E]
    logits = linear64(rms_norm64(x, norm_w, eps), w_out, None)                  # [L+1, V]
    probs = torch.softmax(logits, dim=-1)
    watch_idx = torch.tensor(list(watch), dtype=torch.long)
    rows = []
    for i in range(x.shape[0]):
        top = int(probs[i].argmax())
        rows.append(LensRow(layer=i - 1, rank=rank_of(logits[i], token), prob=float(probs[i, token]),
                            top_token=top, top_prob=float(probs[i, top]),
                            probs=[float(p) for p in probs[i, watch_idx]]))
    return rows
