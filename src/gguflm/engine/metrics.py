"""What the scheduler counts while it serves: tokens, requests, prefix-cache hits, and
the latency of first tokens and of the tokens after them (histograms with fixed
buckets, as Prometheus keeps them: cumulative counts per upper bound, a sum, a count).
Written by the scheduler's thread, read from any thread (:meth:`Metrics.snapshot`);
the server renders a snapshot as Prometheus text (``gguflm.server.metrics``)."""

from __future__ import annotations

import bisect
import collections
import threading
import time
from dataclasses import dataclass, field

# Seconds; vLLM's buckets for the same two histograms, trimmed to what a CPU or one GPU sees.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5)
RATE_WINDOW = 10.0  # seconds over which tokens/s is averaged


@dataclass
class Histogram:
    """Counts of observations at or below each bound (the last, +Inf, counts all)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """[(upper bound, observations <= it)], the last bound +inf."""
        out, run = [], 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts):
            run += c
            out.append((bound, run))
        return out

    def copy(self) -> Histogram:
        h = Histogram(self.bounds)
        h.counts, h.total, h.n = list(self.counts), self.total, self.n
        return h


class Metrics:
    """Counters since start. ``prompt_tokens``: prompt tokens admitted; ``cached_tokens``:
    those whose keys/values came from the prefix cache; ``generation_tokens``: tokens
    generated; ``prefix_queries``/``prefix_hits``: admitted requests, and those that
    found at least one cached block; ``preemptions``: running requests sent back to the
    queue because the KV cache's pool ran out of blocks; ``finished``: ended requests by
    reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.prompt_tokens = self.cached_tokens = self.generation_tokens = 0
        self.prefix_queries = self.prefix_hits = 0
        self.preemptions = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.queue_time = Histogram(TTFT_BUCKETS)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of recent steps

    def admitted(self, n_prompt: int, n_cached: int, waited: float) -> None:
        with self._lock:
            self.prompt_tokens += n_prompt
            self.cached_tokens += n_cached
            self.prefix_queries += 1
            self.prefix_hits += n_cached > 0
            self.queue_time.observe(waited)

    def tokens(self, now: float, first: list[float], later: list[float], generated: int) -> None:
        """A step's chosen tokens at ``now`` (``time.perf_counter()``): the latencies of
        first tokens (since submission) and of later ones (since the request's previous
        token), and how many count as generated (end-of-generation tokens do not)."""
        with self._lock:
            self.generation_tokens += generated
            for latency in first:
                self.ttft.observe(latency)
            for latency in later:
                self.itl.observe(latency)
            self._recent.append((now, generated))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()

    def preempted(self) -> None:
        with self._lock:
            self.preemptions += 1

    def ended(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] += 1

    def snapshot(self) -> dict:
        """A consistent copy: the counters, the histograms, and tokens/s over the last
        ``RATE_WINDOW`` seconds."""
        now = time.perf_counter()
        with self._lock:
            recent = sum(n for t, n in self._recent if t >= now - RATE_WINDOW)
            return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                    "generation_tokens": self.generation_tokens, "prefix_queries": self.prefix_queries,
                    "prefix_hits": self.prefix_hits, "preemptions": self.preemptions,
                    "finished": dict(self.finished),
                    "ttft": self.ttft.copy(), "itl": self.itl.copy(), "queue_time": self.queue_time.copy(),
                    "generation_tokens_per_second": recent / RATE_WINDOW}
