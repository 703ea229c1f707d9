"""The adaptive thread cap (gguflm.kernels.cpu.threads): the governor's decisions on a
simulated machine whose step times change when another process takes a core, and the C++
cap itself, which must not change any result (each output is computed by one thread)."""

from __future__ import annotations

import pytest
import torch

from gguflm.kernels.cpu import threads as th


class Machine:
    """Step times of a 2-thread decode: idle, all threads 1.0 and one thread 1.7; with a
    busy core, all threads 8.0 and one thread 1.7 (measured shapes of the real collapse).
    ``others``: the CPU seconds another process has taken (one core while busy), what
    /proc/stat shows the governor; None: a machine where it cannot be read."""

    def __init__(self, threads: int = 2, sensor: bool = True):
        self.now, self.busy, self.threads, self.sensor = 0.0, False, threads, sensor
        self.taken = 0.0

    def clock(self) -> float:
        return self.now

    def others(self) -> float | None:
        return self.taken if self.sensor else None

    def set_threads(self, n: int) -> None:
        self.threads = n

    @property
    def limit(self) -> int:  # 1 when the governor capped the 2 threads
        return 1 if self.threads == 1 else 0

    def step(self, gov: th.ThreadGovernor, key="k") -> None:  # a decode step: layer 0 begins it
        gov.step(key, 0)
        dt = 1.7 if self.limit == 1 else (8.0 if self.busy else 1.0)
        self.now += dt
        self.taken += dt if self.busy else 0.0

    def run(self, gov, n: int) -> float:
        t0 = self.now
        for _ in range(n):
            self.step(gov)
        return (self.now - t0) / n


def governor(m: Machine, cores: int = 2) -> th.ThreadGovernor:
    return th.ThreadGovernor(m.set_threads, threads=lambda: m.threads, clock=m.clock, others=m.others, cores=cores)


def test_idle_machine_keeps_every_thread():
    m = Machine()
    gov = governor(m)
    per_step = m.run(gov, 20000)
    assert gov.home("k") == 0 and m.limit == 0
    assert per_step < 1.01  # losing one-thread probes cost under 1 %


def test_busy_core_moves_to_one_thread_and_back():
    m = Machine()
    gov = governor(m)
    m.run(gov, 1000)
    m.busy = True
    m.run(gov, 3 * th.WINDOW + th.PROBE_WINDOW)  # the slow window, then the probe
    assert gov.home("k") == 1
    per_step = m.run(gov, 20000)
    assert per_step < 1.7 * 1.1  # probes of all threads cost under 10 % (8x slower each)
    m.busy = False
    m.run(gov, th.PROBE_MAX + 2 * th.WINDOW + th.PROBE_WINDOW)  # the next probe finds the idle core
    assert gov.home("k") == 0
    assert m.run(gov, 1000) < 1.05


@pytest.mark.parametrize("sensor", [True, False])
def test_busy_from_the_start(sensor):
    """A decode that starts beside a busy core: with the sensor, a few slow steps before the
    probe (not two windows); without it (no /proc/stat), the first scheduled probe."""
    m = Machine(sensor=sensor)
    gov = governor(m)
    m.busy = True
    slow = 0
    for _ in range(3 * th.WINDOW):
        slow += m.limit == 0
        m.step(gov)
    assert gov.home("k") == 1 and m.limit == 1
    if sensor:
        assert slow <= 2 * th.PROBE_WINDOW - 1
    else:
        assert slow >= 2 * th.WINDOW


def test_sensor_brings_the_threads_back_when_the_core_frees():
    m = Machine()
    gov = governor(m)
    m.busy = True
    m.run(gov, 100)
    assert gov.home("k") == 1
    m.busy = False
    m.run(gov, 4 * th.PROBE_WINDOW)   # the next look sees the free core, the probe wins
    assert gov.home("k") == 0
    assert m.run(gov, 1000) < 1.01


@pytest.mark.parametrize("one_thread", [1.7, 9.0])
def test_sensor_does_not_probe_more_often_than_the_interval(one_thread):
    """Others keep a core busy but one thread never wins (say, the other process is
    light): a losing probe silences the sensor for the probe interval, so the cost of
    probing stays what the interval allows."""
    m = Machine()
    gov = governor(m)
    m.busy = True
    t0, n = m.now, 20000
    for _ in range(n):
        gov.step("k", 0)
        dt = one_thread if m.limit == 1 else 1.5        # all threads: only a little slower
        m.now += dt
        m.taken += dt
    assert gov.home("k") == (1 if one_thread < 1.5 * th.GAIN else 0)
    if one_thread > 1.5:
        assert (m.now - t0) / n < 1.5 * 1.02


def test_spare_cores_are_not_contention():
    """On 4 cores, a 2-thread decode beside one busy process: nothing to flee, no early probe."""
    m = Machine()
    gov = governor(m, cores=4)
    m.busy = True                    # others take a core; the step times stay idle ones
    for _ in range(2 * th.WINDOW - 1):
        gov.step("k", 0)
        m.now += 1.0
        m.taken += 1.0
    assert m.limit == 0 and gov._states["k"].mode == th.FULL


def test_others_cpu_seconds_sees_another_process():
    """The sensor against the machine itself: a child process spinning for 0.6 s shows up
    as about a core of others' time."""
    import subprocess
    import sys
    import time

    if th.others_cpu_seconds() is None:
        pytest.skip("no /proc/stat here")
    a, t = th.others_cpu_seconds(), time.perf_counter()
    subprocess.run([sys.executable, "-c", "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < 0.6: pass"],
                   check=True)
    b, dt = th.others_cpu_seconds(), time.perf_counter() - t
    assert (b - a) / dt > 0.3


def test_one_thread_means_no_governing():
    m = Machine(threads=1)
    gov = governor(m)
    m.run(gov, 100)
    assert m.threads == 1 and gov.home("k") == 0


def test_release_restores_the_thread_count():
    m = Machine(threads=3)
    gov = governor(m)
    m.busy = True
    m.run(gov, 5 * th.WINDOW)
    assert m.threads == 1 and gov.full_threads() == 3
    gov.release()  # a prefill: every thread
    assert m.threads == 3


def test_keys_are_separate():
    m = Machine()
    gov = governor(m)
    m.busy = True
    for _ in range(5 * th.WINDOW):
        m.step(gov, "a")
    assert gov.home("a") == 1 and gov.home("b") == 0


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_thread_cap_changes_no_result(rows, cpu_kernels, random_weight):
    """qmatmul under a cap of one thread gives the very bits of the uncapped product (and
    both are within the float64 twin's tolerance: test_kernels)."""
    from gguflm.gguf.types import GGMLType

    ops = cpu_kernels.ops()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for t in (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q4_0):
            w = cpu_kernels.QuantWeight(random_weight(t, 1024, 512, seed=3), t, (512, 1024))
            x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
            ops.set_thread_limit(0)
            full = cpu_kernels.qmatmul(x, w)
            ops.set_thread_limit(1)
            one = cpu_kernels.qmatmul(x, w)
            assert torch.equal(full, one)
    finally:
        ops.set_thread_limit(0)
        torch.set_num_threads(old_threads)
