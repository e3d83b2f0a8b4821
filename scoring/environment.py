"""Where a score was measured: device, GPU and CPU names, library versions. Latency means nothing without it."""

from __future__ import annotations

import os
import platform
import sys

from artifacts import library_versions

_EXTRA_LIBRARIES = ("numpy", "opencv-python-headless", "opencv-python", "scikit-image", "pytorch-fid",
                    "torchvision")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device: str) -> dict:
    import torch

    info = {
        "device": device,
        "gpu_name": None,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "libraries": {**library_versions(), **library_versions(_EXTRA_LIBRARIES)},
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(index)
        info.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    return info
