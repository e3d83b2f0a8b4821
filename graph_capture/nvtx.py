"""Named ranges for every pipeline stage: NVTX for nsys, and torch.profiler's record_function so the same names
show in `compute_score.py --trace` traces (nsys report generation fails on our GPU machines)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def nvtx_range(name: str):
    with torch.profiler.record_function(name):
        if not torch.cuda.is_available():
            yield
            return
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
