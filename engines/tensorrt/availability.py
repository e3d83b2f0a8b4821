"""Can this machine run the TensorRT backend? One cheap check with a one-line answer.

Kept apart from the modules that `import tensorrt` at the top, so callers (backend auto-selection, tests, the CLI)
can ask without paying for, or failing on, the import.
"""

from __future__ import annotations

MIN_MAJOR = 10  # the name-based tensor API (set_tensor_address / execute_async_v3) and strongly typed networks


def tensorrt_available() -> tuple[bool, str]:
    """(True, "tensorrt X.Y on <gpu>") or (False, one line saying what is missing and how to get it)."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when the wheel's bindings miss libnvinfer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, (f"tensorrt not importable ({first}): pip install tensorrt (needs NVIDIA's runtime "
                       "libraries and a CUDA GPU); or use the torch backend")
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_MAJOR:
        return False, f"tensorrt {version} is too old: this backend needs TensorRT >= {MIN_MAJOR} (pip install -U tensorrt)"
    import torch

    if not torch.cuda.is_available():
        return False, f"tensorrt {version} is installed but there is no CUDA GPU: use the torch or onnxruntime backend"
    return True, f"tensorrt {version} on {torch.cuda.get_device_name()}"
