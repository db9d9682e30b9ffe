"""timing.py, the harness behind every benchmark figure, timed with a clock the test controls."""

from __future__ import annotations

import numpy as np
import pytest

from fmnist_onnx import timing
from harness import FakeClock


def test_time_calls_times_at_least_min_runs_however_slow():
    clock = FakeClock()
    times = timing.time_calls(lambda: clock.advance(1.0), duration_s=0.1, warmup_s=0, clock=clock)
    assert list(times) == [1.0] * timing.MIN_RUNS
    assert clock.now == 2 + timing.MIN_RUNS  # two warm-up calls, then the timed ones, and no more


def test_latency_percentiles_from_known_times():
    lat = timing.latency_ms(np.array([0.001, 0.002, 0.003, 0.004]))
    assert (lat.min, lat.max, lat.mean) == pytest.approx((1.0, 4.0, 2.5))
    assert lat.p50 == pytest.approx(2.5)


def test_time_calls_leaves_the_warm_up_out():
    clock = FakeClock()
    durations = iter([5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    times = timing.time_calls(lambda: clock.advance(next(durations)), duration_s=1.0, warmup_s=0, clock=clock)
    assert list(times) == [1.0] * timing.MIN_RUNS  # the two warm-up calls of 5 s are in no figure


def test_time_runner_times_the_first_run_apart_and_closes():
    clock = FakeClock()
    closed = []

    def make() -> timing.Runner:
        clock.advance(2.0)  # a session made
        return timing.Runner(lambda: clock.advance(0.5), close=lambda: closed.append(True))

    first, times = timing.time_runner(make, duration_s=1.0, warmup_s=0, clock=clock)
    assert first == 2.5 and list(times) == [0.5] * timing.MIN_RUNS and closed == [True]


def test_best_of_keeps_the_fastest_whole_run():
    clock = FakeClock()
    durations = iter([3.0, 1.0, 2.0])
    assert timing.best_of(lambda: clock.advance(next(durations)), 3, clock) == 1.0
    assert timing.best_of(lambda: clock.advance(4.0), 0, clock) == 4.0  # at least one run
