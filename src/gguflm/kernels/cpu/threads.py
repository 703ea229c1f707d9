"""Fewer threads while another process keeps a core busy: the adaptive thread governor.

A decode step on the CPU runs ~4 parallel regions per layer, each a few tens of
microseconds of work split between all threads, each ending when every thread has
finished its share. When another process keeps one core busy, the thread scheduled on
that core runs only part of the time, and each region waits for it to be scheduled
again (milliseconds): a 2-thread decode dropped ~8x (llama.cpp, whose threads spin at the
same barriers, drops likewise), where one thread alone, on the free core, would keep
~60 % of the idle 2-thread speed.

:class:`ThreadGovernor` times every decode-sized block step (:class:`FusedBlock`) and
keeps, per step shape, a *home* thread count: all of torch's threads, or one. Every
``WINDOW`` calls it takes the median time; it tries the other count for one window when
the median jumped (``SLOWDOWN`` x the last window: contention began or ended) or when its
probe interval has passed (two windows at first, then ``PROBE_MIN`` calls, doubling after each probe that loses, up
to ``PROBE_MAX``), and moves home there when that window's median is below ``GAIN`` x
home's. So an idle machine keeps every thread (a losing one-thread probe costs ~1 % of
the calls at first, ~0.1 % later), and a busy core costs one window of slow steps before
the step moves to one thread and, once the core is free again, at most ``PROBE_MAX``
calls before it moves back. The cap goes to the C++ kernels through
``torch.ops.gguflm_cpu.set_thread_limit`` (their parallel loops read it; torch's own
thread count is left alone). Results do not depend on the thread count (every output is
computed by one thread, in the same order). ``GGUFLM_ADAPTIVE_THREADS=0`` turns it off.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Hashable

import torch

WINDOW = 8          # timed calls per decision (one more is run and not counted: the first after a switch)
SLOWDOWN = 1.5      # a window this much slower than the last one (same count) starts a probe
GAIN = 0.85         # the other count wins when its median is below GAIN x home's
PROBE_MIN = 256     # calls between probes, first
PROBE_MAX = 4096    # ... and at most (the interval doubles after each losing probe)
FULL, ONE = 0, 1    # the two thread counts: all of torch's threads, one thread


class _State:
    __slots__ = ("home", "mode", "times", "median", "calls", "interval", "next_probe")

    def __init__(self):
        self.home = self.mode = FULL
        self.times: list[float] = []
        self.median: list[float | None] = [None, None]  # last window's median per count
        self.calls = 0
        self.interval = PROBE_MIN
        self.next_probe = 2 * (WINDOW + 1)  # the first probe early: the core may be busy from the start


class ThreadGovernor:
    """Chooses the thread cap of each timed call (see the module doc).

    ``set_limit(n)``: applies a cap (0 = none); ``threads()``: torch's thread count;
    ``clock``: seconds. All injectable, for tests."""

    def __init__(self, set_limit: Callable[[int], object], threads: Callable[[], int] = torch.get_num_threads,
                 clock: Callable[[], float] = time.perf_counter):
        self._set_limit, self._threads, self.clock = set_limit, threads, clock
        self._states: dict[Hashable, _State] = {}
        self._applied: int | None = None

    def _apply(self, limit: int) -> None:
        if limit != self._applied:
            self._set_limit(limit)
            self._applied = limit

    def start(self, key: Hashable) -> float:
        """Before a call of shape ``key``: sets its cap; returns the start time for :meth:`stop`."""
        if self._threads() <= 1:
            self._apply(0)
        else:
            st = self._states.get(key)
            if st is None:
                st = self._states[key] = _State()
            self._apply(1 if st.mode == ONE else 0)
        return self.clock()

    def release(self) -> None:
        """An ungoverned call (a prefill): no cap."""
        self._apply(0)

    def stop(self, key: Hashable, t0: float) -> None:
        """After the call started by ``start(key)`` at ``t0``."""
        st = self._states.get(key)
        if st is None:
            return
        st.calls += 1
        st.times.append(self.clock() - t0)
        if len(st.times) <= WINDOW:
            return
        m = statistics.median(st.times[1:])
        st.times.clear()
        last = st.median[st.mode]
        st.median[st.mode] = m
        if st.mode != st.home:  # a probe's window ended
            if m < GAIN * st.median[st.home]:
                st.home, st.interval = st.mode, PROBE_MIN
            else:
                st.interval = min(2 * st.interval, PROBE_MAX)
            st.mode = st.home
            st.next_probe = st.calls + st.interval
        elif st.calls >= st.next_probe or (last is not None and m > SLOWDOWN * last):
            st.mode = ONE - st.home

    def home(self, key: Hashable) -> int:
        """The thread cap calls of shape ``key`` settle on now (0: none)."""
        st = self._states.get(key)
        return 1 if st is not None and st.home == ONE else 0


_governor: ThreadGovernor | None = None


def governor() -> ThreadGovernor | None:
    """The process's governor over the C++ kernels (None when GGUFLM_ADAPTIVE_THREADS=0)."""
    global _governor
    if _governor is None and os.environ.get("GGUFLM_ADAPTIVE_THREADS", "1") != "0":
        from gguflm.quant.cpu.build import ops

        _governor = ThreadGovernor(ops().set_thread_limit)
    return _governor
