"""Speed as users get it: every figure goes through the generation loop (``LLM.stream``:
the one-slot scheduler, sampling on the device, detokenization), as llama-bench's
columns name them.

* ``tg N``: N tokens generated greedily from a one-token prompt (end of generation
  ignored): N forwards through the loop, the first at position 0.
* ``pp N``: a fresh random N-token prompt each repetition, from admission to its first
  token. Where the model keeps captured graphs per prompt length (CUDA: a new prompt is
  padded to its length bucket's graph, captured on the bucket's first prompt), two rows:
  ``fresh`` (new tokens; shapes seen twice forgotten, the bucket's graph replayed: what
  every prompt but the first of its length costs) and ``first`` (every graph forgotten
  before each repetition: the bucket's capture included).
* ``tg N @ dD``: N decode steps after a D-token prompt (the decode time only).
* ``cold start``: a fresh process: interpreter start -> import -> load -> first token.

Each figure is the mean and sample standard deviation of the repetitions' tokens/s.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gguflm.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@dataclass
class Row:
    """One line of the table: ``test`` as llama-bench names it; tokens/s per repetition
    (or seconds, for ``unit == "s"``)."""

    test: str
    values: list[float] = field(default_factory=list)
    unit: str = "t/s"
    note: str = ""
    phases: list[str] = field(default_factory=list)  # cold start: the child's progress and timing lines

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"mean": self.mean, "sd": self.sd}


class Bench:
    """Measurements of ``llm`` (an :class:`gguflm.engine.llm.LLM`), random prompts from ``seed``."""

    def __init__(self, llm: Any, reps: int = 5, seed: int = 0):
        self.llm, self.reps = llm, reps
        self.rng = random.Random(seed)

    def _prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(self.llm.config.n_vocab) for _ in range(n)]

    def _run(self, prompt: list[int], max_tokens: int):
        s = self.llm.stream(prompt, max_tokens, GREEDY, ignore_eos=True)
        t0 = time.perf_counter()
        for _ in s:
            pass
        return s, time.perf_counter() - t0

    def tg(self, n: int) -> Row:
        row = Row(f"tg{n}")
        self._run(self._prompt(1), n)                                   # warm-up
        for _ in range(self.reps):
            s, seconds = self._run(self._prompt(1), n)
            row.values.append(s.result.n_generated / seconds)
        return row

    def depth(self, n: int, d: int) -> Row:
        row = Row(f"tg{n} @ d{d}")
        self._run(self._prompt(d), 2)                                   # warm-up
        for _ in range(self.reps):
            s, _ = self._run(self._prompt(d), n + 1)
            row.values.append((s.result.n_generated - 1) / s.result.decode_seconds)
        return row

    def pp(self, n: int) -> list[Row]:
        model = self.llm.model
        forget: Callable[[], None] | None = getattr(model, "forget_shapes", None)

        def once() -> float:
            s, _ = self._run(self._prompt(n), 1)
            return n / s.result.prefill_seconds

        if forget is None:                                             # no per-shape state: one row
            once()                                                     # warm-up
            return [Row(f"pp{n}", [once() for _ in range(self.reps)])]
        first = Row(f"pp{n}", note="first prompt of its length (the length's graph captured, or eager)")
        once()                                                         # kernels compiled
        for _ in range(self.reps):
            forget(buckets=True)
            first.values.append(once())
        fresh = Row(f"pp{n}", note="fresh prompt: new tokens, its length's graph replayed (eager past 512)")
        for _ in range(self.reps):
            forget()                                                   # shapes seen twice: dropped
            fresh.values.append(once())
        return [fresh, first]

    def ceiling(self, n: int) -> Row | None:
        """CUDA only: n greedy steps as graph replays back to back, with no sampling and no
        host work: what the loop could reach, not what a user gets."""
        model = self.llm.model
        if not hasattr(model, "decode_greedy"):
            return None
        import torch

        row = Row(f"tg{n}", note="ceiling: decode graph replays back to back, no loop (not a user's path)")
        cache = model.new_cache(1, n)
        model.decode_greedy(0, 0, n, cache)
        for _ in range(self.reps):
            torch.cuda.synchronize(model.device)
            t0 = time.perf_counter()
            model.decode_greedy(self._prompt(1)[0], 0, n, cache)
            torch.cuda.synchronize(model.device)
            row.values.append(n / (time.perf_counter() - t0))
        return row


COLD_CHILD = """\
import sys, time
t0 = time.time()
import torch
t1 = time.time()
from gguflm.quant.cuda import timing
timing.note("interpreter up", at=t0)
timing.note("import torch", t1 - t0, at=t1)
import gguflm
m = gguflm.load(sys.argv[1], device=sys.argv[2], n_ctx=64)
timing.note("gguflm.load returned")
next(iter(m.generate("Hello", max_tokens=1, temperature=0, ignore_eos=True)))
timing.note("first token")
print(time.time())
"""

_TIMING = re.compile(r"^gguflm timing:\s+([\d.]+) s  (.*?)(?:  ([\d.]+) s)?$")


def summarize(lines: list[str]) -> str:
    """One line of a cold start's phases from its ``gguflm timing:`` lines (GGUFLM_TIMING=1)."""
    sums: dict[str, float] = {}
    n_triton = 0
    first = None
    for line in lines:
        m = _TIMING.match(line.strip())
        if not m:
            continue
        at, what, took = float(m[1]), m[2], float(m[3]) if m[3] else 0.0
        for key, prefix in (("torch import", "import torch"), ("CUDA path import", "import the CUDA path"),
                            ("CUDA init", "CUDA init"), ("weights", "weights to the device"),
                            ("nvcc", "nvcc build"), ("waited for nvcc", "waited for the background build"),
                            ("precompile", "precompile ("), ("decode warm-up+capture", "decode step:")):
            if what.startswith(prefix):
                sums[key] = sums.get(key, 0.0) + took
        if what.startswith("triton compile"):
            n_triton += 1
            sums["triton"] = sums.get("triton", 0.0) + took
        if what == "first token":
            first = at
    parts = [f"{k} {v:.2f} s" for k, v in sums.items() if k != "triton"]
    if n_triton:
        parts.append(f"{n_triton} Triton compilations {sums['triton']:.2f} s")
    if first is not None:
        parts.append(f"first token at {first:.2f} s after process start")
    return ", ".join(parts)


def cold_start(path: str, device: str, reps: int = 1, empty_kernel_cache: bool = False) -> Row:
    """Seconds from a fresh interpreter's start to its first generated token. With
    ``empty_kernel_cache``, Triton's and gguflm's kernel caches (TRITON_CACHE_DIR,
    GGUFLM_KERNEL_CACHE) are a new empty folder each time: every kernel is compiled. The
    child runs with GGUFLM_TIMING=1: its phases (the last repetition's) are in ``phases``
    and summed up in the note (and echoed on stderr when this process has GGUFLM_TIMING=1)."""
    row = Row("cold start" + (" (empty kernel cache)" if empty_kernel_cache else ""), unit="s",
              note="process start -> import -> load -> first token")
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, GGUFLM_TIMING="1")
            if empty_kernel_cache:
                env["TRITON_CACHE_DIR"] = env["GGUFLM_KERNEL_CACHE"] = tmp
            t0 = time.time()
            r = subprocess.run([sys.executable, "-c", COLD_CHILD, str(path), device], capture_output=True,
                               text=True, env=env, timeout=900)
            if r.returncode != 0:
                raise RuntimeError(f"the cold-start child failed: {r.stderr.strip()[-500:]}")
            row.values.append(float(r.stdout.strip().splitlines()[-1]) - t0)
            row.phases = [line for line in r.stderr.splitlines() if line.startswith("gguflm")]
    if os.environ.get("GGUFLM_TIMING", "0") not in ("", "0"):
        print("\n".join(f"[{row.test}] {line}" for line in row.phases), file=sys.stderr, flush=True)
    if summary := summarize(row.phases):
        row.note += f" ({summary})"
    return row
