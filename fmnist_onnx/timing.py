"""The timing harness behind every benchmark figure: a callable, timed call by call, its first run apart.

Method, the same for everything `fmnist-onnx bench` measures:
1. the first run (session creation or model load, plus the first call) is timed on its own and reported apart,
   never mixed into the figures below;
2. warm-up calls for a quarter of the duration (at most 0.5 s, and at least 2 calls);
3. timed calls, one clock reading before and after each, until ``duration_s`` has passed and at least
   MIN_RUNS calls were timed. Latency percentiles come from those per-call times.

The clock is a parameter (``time.perf_counter`` by default): a test hands in a clock it controls and knows
exactly which durations were "measured".
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MIN_RUNS = 5
Clock = Callable[[], float]


@dataclass
class LatencyMs:
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    mean: float


def latency_ms(seconds: np.ndarray) -> LatencyMs:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyMs(p50=float(p50), p90=float(p90), p99=float(p99), min=float(ms.min()), max=float(ms.max()),
                     mean=float(ms.mean()))


@dataclass
class Runner:
    """A ready-to-call inference on one prepared batch; ``context`` is held around all the calls
    (torch.inference_mode for PyTorch: entering it per call would bill its cost to the model)."""

    run: Callable[[], object]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    close: Callable[[], None] = lambda: None


def time_calls(run: Callable[[], object], duration_s: float, warmup_s: float | None = None,
               clock: Clock = time.perf_counter) -> np.ndarray:
    """Seconds of each timed call of ``run`` after the warm-up (steps 2 and 3 of the module docstring).
    The garbage collector is paused meanwhile, as timeit does."""
    warmup_s = min(0.5, duration_s / 4) if warmup_s is None else warmup_s
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        end, n = clock() + warmup_s, 0
        while n < 2 or clock() < end:
            run()
            n += 1
        times: list[float] = []
        start = clock()
        while True:
            t0 = clock()
            run()
            t1 = clock()
            times.append(t1 - t0)
            if t1 - start >= duration_s and len(times) >= MIN_RUNS:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return np.asarray(times)


def time_runner(make: Callable[[], Runner], duration_s: float, warmup_s: float | None = None,
                clock: Clock = time.perf_counter) -> tuple[float, np.ndarray]:
    """(seconds of the first run: ``make()`` plus the first call, seconds of each timed call after it)."""
    t0 = clock()
    runner = make()
    try:
        with runner.context():
            runner.run()
            first_s = clock() - t0
            times = time_calls(runner.run, duration_s, warmup_s, clock)
    finally:
        runner.close()
    return first_s, times


def best_of(run: Callable[[], object], repeats: int, clock: Clock = time.perf_counter) -> float:
    """Seconds of the fastest of ``repeats`` whole runs (the one least disturbed by other work)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = clock()
        run()
        best = min(best, clock() - t0)
    return best
