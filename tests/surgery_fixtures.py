"""Shared builds for the surgery and onnxruntime tests (not a test module itself).

Every build goes to one session-wide folder under pytest's base temp, through build_onnx's own cache: a second test
module asking for the same build gets the manifest reuse path (seconds) instead of a second export.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from profiles import Precision, get_profile

TINY = "synthetic-tiny"


def small_profile(precision: Precision = Precision.FP32, num_samples: int = 1):
    """64x64 (latent 8x8): the smallest size the tiny UNet's three downsamplings allow, for fast parity tests."""
    base = get_profile("256x384-fp32")
    name = f"test-64x64-{Precision(precision).value}" + (f"-x{num_samples}" if num_samples > 1 else "")
    return dataclasses.replace(base, name=name, height=64, width=64, precision=Precision(precision),
                               num_samples=num_samples)


def one_torch_thread():
    """Generator for an autouse fixture: torch on one thread while these tests run. The tiny networks gain nothing
    from threads, and on a shared 2-core CI machine torch's OpenMP workers thrash (measured: one 64x64 tiny step
    8.9 s with 2 threads under load vs 0.03 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def session_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "surgery-session"
    root.mkdir(exist_ok=True)
    return root


def tiny_bundle(tmp_path_factory):
    from models import load_bundle

    return load_bundle(TINY, cache_root=session_root(tmp_path_factory) / "weights")


def build(tmp_path_factory, bundle, profile, folder: str, **kwargs) -> dict[str, Path]:
    from surgery import build_onnx

    return build_onnx(bundle, profile, session_root(tmp_path_factory) / folder, **kwargs)
