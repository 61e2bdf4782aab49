"""Shared by the step benchmarks (not a benchmark itself: `make bench` skips `_*.py`)."""

from __future__ import annotations

import statistics
import time

import torch


def median_times(fns: dict, warmup: int, reps: int) -> dict:
    """Median seconds per call of each fn; reps are interleaved round-robin so that a change in machine
    load during the run hits every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
