"""CUDA-event timing after warm-up; medians, never single shots."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int


def time_cuda(fn: Callable[[], object], warmup: int = 2, runs: int = 10) -> Timing:
    """Device time of fn() between CUDA events (synchronised once per run)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return Timing(statistics.median(times), min(times), max(times), runs)


def time_wall(fn: Callable[[], object], warmup: int = 1, runs: int = 10) -> Timing:
    """Host wall-clock of fn(), for calls that end in a host copy (like process())."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), max(times), runs)
