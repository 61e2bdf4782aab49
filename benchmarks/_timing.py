"""Shared by the step benchmarks (not a benchmark itself: `make bench` skips `_*.py`)."""

from __future__ import annotations

import statistics
import time

import torch


def median_wall_and_cpu_times(fns: dict, warmup: int, reps: int) -> tuple[dict, dict]:
    """Median wall seconds and median process CPU seconds per call of each fn; reps are interleaved
    round-robin so that a change in machine load during the run hits every variant alike.

    CPU time is what a CPU run on a shared host can compare: with one thread (``--threads 1``) it hardly
    moves with the other processes' load, while wall time stretches by however long the run waits."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    median = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return median(wall), median(cpu)


def median_times(fns: dict, warmup: int, reps: int) -> dict:
    """Median wall seconds per call of each fn (see :func:`median_wall_and_cpu_times`)."""
    return median_wall_and_cpu_times(fns, warmup, reps)[0]
