"""How far one computation is from another: the numbers every check and report uses.

``rel`` is the relative Frobenius error ``||ours - ref||_2 / ||ref||_2`` (0 when both are
zero); ``max_abs`` the largest element-wise difference. Logit comparisons turn both sides
into distributions with a float64 softmax and measure ``KL(P_ref || P_ours)`` per position,
the direction llama-perplexity uses (the reference is the base distribution).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ErrorStats:
    """Element-wise distance of ``ours`` from ``ref``."""

    max_abs: float
    rel: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def error_stats(ours: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> ErrorStats:
    """Max |ours - ref| and ||ours - ref|| / ||ref||, computed in float64; shapes must match."""
    a = torch.as_tensor(ours).to(torch.float64)
    b = torch.as_tensor(ref).to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return ErrorStats(0.0, 0.0)
    d = a - b
    max_abs = float(d.abs().max())
    den = float(torch.linalg.vector_norm(b))
    num = float(torch.linalg.vector_norm(d))
    rel = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    return ErrorStats(max_abs, rel)


@dataclass(frozen=True)
class LogitAgreement:
    """``ours`` against ``ref`` over ``positions`` rows of logits."""

    positions: int
    top1_agreement: float    # fraction of rows whose argmax is the same token
    kl_mean: float           # mean over rows of KL(P_ref || P_ours), nats
    kl_max: float
    max_abs_dlogit: float    # max |ours - ref| over every row and token

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def kl_per_row(ours: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Float64 [T]: ``KL(softmax(ref) || softmax(ours))`` of each row of two [T, V] logit arrays."""
    lp = torch.log_softmax(torch.as_tensor(ours).to(torch.float64), dim=-1)
    lq = torch.log_softmax(torch.as_tensor(ref).to(torch.float64), dim=-1)
    return (lq.exp() * (lq - lp)).sum(dim=-1).clamp(min=0.0)


def logit_agreement(ours: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> LogitAgreement:
    """Compare two [T, V] logit arrays row by row (see :class:`LogitAgreement`)."""
    a = torch.as_tensor(ours).to(torch.float64)
    b = torch.as_tensor(ref).to(torch.float64)
    if a.shape != b.shape or a.dim() != 2 or a.shape[0] == 0:
        raise ValueError(f"need two equal non-empty [T, V] arrays, got {tuple(a.shape)} and {tuple(b.shape)}")
    kl = kl_per_row(a, b)
    return LogitAgreement(
        positions=int(a.shape[0]),
        top1_agreement=float((a.argmax(-1) == b.argmax(-1)).double().mean()),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        max_abs_dlogit=float((a - b).abs().max()),
    )
