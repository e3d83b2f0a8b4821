"""A torch.profiler chrome trace (chrome://tracing, Perfetto) of one process() call.

The call is an extra one after the timed loop, so profiling overhead never reaches the reported latencies. The
pipeline's NVTX ranges (preprocess, text, hint, denoise, decode) show up in Nsight; in this trace the CPU ops and
CUDA kernels show where each stage's time goes.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Callable

from artifacts import atomic_file


def write_trace(call: Callable[[], object], path: "str | Path", device: str) -> Path:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    path = Path(path)
    with atomic_file(path) as tmp:
        if path.suffix == ".gz":
            plain = tmp.with_name(tmp.name + ".json")
            try:
                prof.export_chrome_trace(str(plain))
                with open(plain, "rb") as src, gzip.open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            finally:
                plain.unlink(missing_ok=True)
        else:
            prof.export_chrome_trace(str(tmp))
    return path
