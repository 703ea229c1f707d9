"""Sampling as free functions, in llama.cpp's default chain order
(common/sampling.cpp with common_params_sampling's defaults):

    penalties -> top-k -> top-p -> min-p -> temperature -> dist

Candidates are a pair ``(ids, logits)`` of 1-D tensors (Long[N], Float32[N]) on the device
that holds the logits; a filtered-out candidate keeps its place with logit -inf (shapes
never depend on the data, so the chain runs without a host sync and only the chosen id
is read back). The filters follow llama-sampler.cpp: top-p and min-p see the
temperature-1 distribution (temperature is applied last); ``temperature <= 0`` keeps only
the highest logit (greedy).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SEED_MAX = (1 << 64) - 1  # torch generators take 64-bit seeds
Candidates = tuple[torch.Tensor, torch.Tensor]  # (ids Long[N], logits Float32[N])


class SamplingError(ValueError):
    """The logits cannot be sampled from (NaN, +inf, or every token at -inf)."""


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's defaults (common_params_sampling); ``seed=None`` draws a fresh seed."""

    temperature: float = 0.8
    top_k: int = 40             # <= 0: whole vocabulary
    top_p: float = 0.95         # 1.0: disabled
    min_p: float = 0.05         # 0.0: disabled
    repeat_penalty: float = 1.0  # 1.0: disabled
    repeat_last_n: int = 64     # tokens of history the penalties look at (0: disabled)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        # The ranges the server's request schema accepts too (server/schemas.py): outside
        # them a filter could keep no candidate at all (min_p > 1).
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must lie in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must lie in [0, {SEED_MAX}], got {self.seed}")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat_penalty must be positive")
        if self.repeat_last_n < -1:
            raise ValueError("repeat_last_n must be >= -1 (-1: the whole context)")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalties_enabled(self) -> bool:
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                                            or self.frequency_penalty != 0.0)


def apply_penalties(logits: torch.Tensor, history: Sequence[int], repeat: float = 1.0,
                    frequency: float = 0.0, presence: float = 0.0) -> torch.Tensor:
    """For each token that occurs ``c > 0`` times in ``history``: divide a positive logit by
    ``repeat`` (multiply a non-positive one), then subtract ``c * frequency + presence``.
    logits: Float32[V] (not modified) -> Float32[V]."""
    counts = Counter(history)
    if not counts:
        return logits
    ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
    c = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    sel = logits[ids]
    sel = torch.where(sel <= 0, sel * repeat, sel / repeat) - (c * frequency + presence)
    out = logits.clone()
    out[ids] = sel
    return out


def top_k(cand: Candidates, k: int) -> Candidates:
    """The ``k`` highest logits, sorted descending; ``k <= 0`` keeps everything as is."""
    ids, logits = cand
    if k <= 0:
        return cand
    vals, idx = torch.topk(logits, min(k, logits.numel()))
    return ids[idx], vals


def top_p(cand: Candidates, p: float) -> Candidates:
    """Sorted descending, the shortest prefix whose softmax mass reaches ``p``; the rest
    is masked to -inf (shapes stay put: no host sync)."""
    if p >= 1.0:
        return cand
    ids, logits = _sorted(cand)
    probs = torch.softmax(logits, dim=0)
    before = torch.cumsum(probs, dim=0) - probs          # mass of the tokens ahead of each
    keep = before < p
    keep[0] = True
    return ids, logits.masked_fill(~keep, float("-inf"))


def min_p(cand: Candidates, p: float) -> Candidates:
    """Tokens whose probability is at least ``p`` times the top one's:
    ``logit >= max_logit + log(p)``; the rest masked to -inf."""
    if p <= 0.0:
        return cand
    ids, logits = cand
    return ids, logits.masked_fill(logits < logits.max() + math.log(p), float("-inf"))


def apply_temperature(cand: Candidates, temperature: float) -> Candidates:
    """Divide by ``temperature``; ``<= 0`` keeps only the (first) highest logit."""
    ids, logits = cand
    if temperature <= 0:
        i = torch.argmax(logits).view(1)
        return ids[i], logits[i]
    return ids, logits / temperature


def sample_dist(cand: Candidates, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one id with probability ``softmax(logits)``: a 0-d Long tensor on the
    candidates' device."""
    ids, logits = cand
    if ids.numel() == 1:
        return ids[0]
    probs = torch.softmax(logits.double(), dim=0)
    return ids[torch.multinomial(probs, 1, generator=generator)[0]]


def _sorted(cand: Candidates) -> Candidates:
    ids, logits = cand
    order = torch.argsort(logits, descending=True, stable=True)
    return ids[order], logits[order]


def choose(logits: torch.Tensor, params: SamplingParams, history: Sequence[int] = (),
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token from ``logits`` (Float32[V]) through the whole chain, on the logits'
    device: a 0-d Long tensor there (nothing is read back; the caller reads the ids of a
    whole step at once). ``history`` holds the tokens seen so far (prompt and generated);
    the last ``repeat_last_n`` count. ``generator`` must live on the logits' device; a
    seed draws the same tokens from the same logits on that device. Logits that cannot
    be sampled from (a NaN, +inf, or all at -inf) give the id -1 (checked without a sync:
    the row is replaced by zeros and the draw discarded)."""
    logits = logits.float()
    if params.penalties_enabled:
        last = list(history) if params.repeat_last_n < 0 else list(history)[-params.repeat_last_n:]
        logits = apply_penalties(logits, last, params.repeat_penalty,
                                 params.frequency_penalty, params.presence_penalty)
    finite = torch.isfinite(logits.max())                 # False if any is NaN or +inf, or all -inf
    if params.greedy:  # every filter keeps the top logit, and temperature <= 0 keeps only it
        return torch.where(finite, torch.argmax(logits), -1)
    logits = torch.where(finite, logits, 0.0)
    cand: Candidates = (torch.arange(logits.numel(), device=logits.device), logits)
    cand = top_k(cand, params.top_k)
    cand = top_p(cand, params.top_p)
    cand = min_p(cand, params.min_p)
    cand = apply_temperature(cand, params.temperature)
    return torch.where(finite, sample_dist(cand, generator), -1)


def sample(logits: torch.Tensor, params: SamplingParams, history: Sequence[int] = (),
           generator: torch.Generator | None = None) -> int:
    """:func:`choose`, read back as an int; raises SamplingError for logits that cannot
    be sampled from."""
    tok = int(choose(logits, params, history, generator))
    if tok < 0:
        raise SamplingError("cannot sample: the logits are not finite")
    return tok


def new_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (None: a fresh random seed)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
