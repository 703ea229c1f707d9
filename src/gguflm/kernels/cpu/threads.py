"""Fewer threads while another process keeps a core busy: the adaptive thread governor.

A decode step on the CPU runs ~4 parallel regions per layer, each a few tens of
microseconds of work split between all threads, each ending when every thread has
finished its share. When another process keeps one core busy, the thread scheduled on
that core runs only part of the time, and each region waits for it to be scheduled
again (milliseconds): a 2-thread decode dropped ~8x (llama.cpp, whose threads spin at the
same barriers, drops likewise), where one thread alone, on the free core, would keep
~60 % of the idle 2-thread speed.

:class:`ThreadGovernor` times every decode step (from one call of the first
:class:`FusedBlock` of a decode-sized step to the next: the output head and sampling
count too) and keeps, per step shape, a *home* thread count: all of torch's threads, or
one. Every ``WINDOW`` steps it takes the median time; it tries the other count for
``PROBE_WINDOW`` steps when the median jumped (``SLOWDOWN`` x the last window:
contention began or ended) or when its probe interval has passed (two windows at first,
then ``PROBE_MIN`` steps, doubling after each probe that loses, up to ``PROBE_MAX``),
and moves home there when the probe's median is below ``GAIN`` x home's. So an idle
machine keeps every thread (a losing one-thread probe costs ~0.5 % of the steps at
first, less later), and a busy core costs one window of slow steps before decoding moves
to one thread and, once the core is free again, at most ``PROBE_MAX`` steps before it
moves back. The cap is torch's thread count itself
(``torch.set_num_threads``, restored when the cap is lifted): capping only the C++ kernels
was not enough, as the step's other parallel ATen ops (sampling over the vocabulary,
softmax) kept a 2-thread team whose every region waited for the descheduled thread
(measured: a capped 2-thread process decoded at 21-45 tok/s under a busy core, a
1-thread process at 71-81). Results do not depend on the thread count (every output of
our kernels is computed by one thread, in the same order). ``GGUFLM_ADAPTIVE_THREADS=0``
turns it off.

A busy core is also *seen* directly, not only through slower steps: every
``PROBE_WINDOW`` steps outside a probe the governor reads how much CPU time other
processes took on the cores this process may run on (``/proc/stat`` minus this process's
own CPU time, :func:`others_cpu_seconds`). When home is every thread and they kept more
cores busy than this process leaves free (``BUSY_CORES`` of a core more), it probes one
thread at once instead of waiting for the end of a window or its probe interval; when home
is one thread and they no longer do, it probes every thread. A decode that starts beside a
busy core then pays ~``PROBE_WINDOW`` slow steps before the probe instead of ``2 x WINDOW``,
and one that outlives the busy process gets its threads back within a few steps instead of
up to ``PROBE_MAX``. The decision is still the probe's measured step times, and a probe that
loses silences the sensor for the probe interval; an idle machine never probes early, so
it pays nothing for the sensor but one read of ``/proc/stat`` per ``PROBE_WINDOW`` steps.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Hashable

import torch

WINDOW = 8          # steps of the home thread count per decision
PROBE_WINDOW = 3    # steps of a probe of the other count
SLOWDOWN = 1.5      # a window this much slower than the last one (same count) starts a probe
GAIN = 0.85         # the other count wins when its median is below GAIN x home's
PROBE_MIN = 256     # steps between probes, first
PROBE_MAX = 4096    # ... and at most (the interval doubles after each losing probe)
BUSY_CORES = 0.5    # others' CPU use beyond the cores this process leaves free that starts a probe
FULL, ONE = 0, 1    # the two thread counts: all of torch's threads, one thread


class _State:
    __slots__ = ("home", "mode", "times", "median", "steps", "interval", "next_probe", "t_last", "seen", "quiet_until")

    def __init__(self):
        self.home = self.mode = FULL
        self.times: list[float] = []
        self.median: list[float | None] = [None, None]  # last window's median per count
        self.steps = 0
        self.interval = PROBE_MIN
        self.next_probe = 2 * WINDOW  # the first probe early: the core may be busy from the start
        self.t_last: float | None = None  # when the step in progress began
        self.seen: tuple[int, float, float] | None = None  # (steps, clock, others' CPU s) at the last look
        self.quiet_until = 0  # no early probe before this step (after a losing probe: its interval)


class ThreadGovernor:
    """Chooses the thread cap of each decode step (see the module doc).

    A step is timed from one call of its first block (``layer == 0``) to the next, so the
    time outside the blocks (output head, sampling, Python) counts too: under contention
    that is where a 2-thread team stalls as much as in the blocks.
    ``set_threads(n)`` / ``threads()``: set / read the thread count (torch's);
    ``clock``: seconds; ``others()``: CPU seconds other processes have used on this
    process's cores so far (None: unknown); ``cores``: how many cores this process may
    use. All injectable, for tests."""

    def __init__(self, set_threads: Callable[[int], object] = torch.set_num_threads,
                 threads: Callable[[], int] = torch.get_num_threads, clock: Callable[[], float] = time.perf_counter,
                 others: Callable[[], float | None] | None = None, cores: int | None = None):
        self._set_threads, self._threads, self.clock = set_threads, threads, clock
        self._others = others if others is not None else others_cpu_seconds
        self._cores = cores if cores is not None else len(_allowed_cpus())
        self._states: dict[Hashable, _State] = {}
        self._applied = 0      # the cap in force (0: none)
        self._full = 0         # the thread count to restore when the cap is lifted

    def _apply(self, limit: int) -> None:
        if limit == self._applied:
            return
        if limit:
            self._full = self._threads()
            self._set_threads(limit)
        else:
            self._set_threads(self._full)
        self._applied = limit

    def full_threads(self) -> int:
        """The thread count without the cap."""
        return self._full if self._applied else self._threads()

    def step(self, key: Hashable, layer: int) -> None:
        """Before a decode-sized block call of shape ``key`` at ``layer``: at layer 0 a step
        ends (its time is recorded) and the next begins; sets the step's cap."""
        if self.full_threads() <= 1:
            self._apply(0)
            return
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _State()
        if layer == 0:
            now = self.clock()
            if st.t_last is not None:
                self._record(st, now - st.t_last)
                self._look(st, now)
            st.t_last = now
        self._apply(1 if st.mode == ONE else 0)

    def release(self) -> None:
        """An ungoverned call (a prefill): no cap, and the step in progress is not timed."""
        self._apply(0)
        for st in self._states.values():
            st.t_last = None

    def _look(self, st: _State, now: float) -> None:
        """Every PROBE_WINDOW steps outside a probe: probe the other count at once when what
        other processes did since the last look says it may win (home is every thread and
        they kept more than the spare cores busy, or home is one thread and they no longer
        do). Not again before the probe interval once a probe ended: the sensor cannot make
        the governor probe more often than its interval allows."""
        if st.mode != st.home or st.steps < st.quiet_until:
            st.seen = None
            return
        if st.seen is not None and st.steps - st.seen[0] < PROBE_WINDOW:
            return
        others = self._others()
        if others is None:
            return
        if st.seen is not None and now > st.seen[1] and len(st.times) >= PROBE_WINDOW:
            busy = (others - st.seen[2]) / (now - st.seen[1])          # cores others kept busy
            contended = busy >= max(0, self._cores - self.full_threads()) + BUSY_CORES
            if contended == (st.home == FULL):
                st.median[st.home] = statistics.median(st.times)       # the window so far stands for home
                st.times.clear()
                st.mode, st.seen = ONE - st.home, None
                return
        st.seen = (st.steps, now, others)

    def _record(self, st: _State, dt: float) -> None:
        st.steps += 1
        st.times.append(dt)
        if len(st.times) < (WINDOW if st.mode == st.home else PROBE_WINDOW):
            return
        m = statistics.median(st.times)
        st.times.clear()
        last = st.median[st.mode]
        st.median[st.mode] = m
        if st.mode != st.home:  # a probe's window ended
            if m < GAIN * st.median[st.home]:
                st.home, st.interval = st.mode, PROBE_MIN
                st.quiet_until = st.steps + PROBE_WINDOW   # the sensor may look again at once
            else:
                st.interval = min(2 * st.interval, PROBE_MAX)
                st.quiet_until = st.steps + st.interval
            st.mode = st.home
            st.next_probe = st.steps + st.interval
        elif st.steps >= st.next_probe or (last is not None and m > SLOWDOWN * last):
            st.mode = ONE - st.home

    def home(self, key: Hashable) -> int:
        """The thread cap steps of shape ``key`` settle on now (0: none)."""
        st = self._states.get(key)
        return 1 if st is not None and st.home == ONE else 0


def _allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def others_cpu_seconds() -> float | None:
    """CPU seconds (busy: not idle nor iowait) used so far on the cores this process may run
    on, minus this process's own CPU time: what other processes took there. None where
    ``/proc/stat`` cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    allowed = {f"cpu{i}" for i in _allowed_cpus()}
    ticks = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name in allowed:
            v = [int(x) for x in rest.split()]
            ticks += sum(v[:8]) - v[3] - v[4]     # user nice system idle iowait irq softirq steal
    return ticks / os.sysconf("SC_CLK_TCK") - time.process_time()


_governor: ThreadGovernor | None = None


def governor() -> ThreadGovernor | None:
    """The process's governor over the C++ kernels (None when GGUFLM_ADAPTIVE_THREADS=0)."""
    global _governor
    if _governor is None and os.environ.get("GGUFLM_ADAPTIVE_THREADS", "1") != "0":
        _governor = ThreadGovernor()
    return _governor
