"""Wall-clock timing of a callable in the process that does the work."""
from __future__ import annotations

import statistics
import time


def timed(fn, rounds: int, warmup: int) -> list[float]:
    """Seconds of each of `rounds` calls of fn after `warmup` untimed ones."""
    times = []
    for r in range(warmup + rounds):
        t0 = time.perf_counter()
        fn()
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def median_time(fn, reps: int = 5) -> float:
    """Median seconds of `reps` calls after one warm-up call."""
    return statistics.median(timed(fn, reps, 1))
