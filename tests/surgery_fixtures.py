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


def session_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "surgery-session"
    root.mkdir(exist_ok=True)
    return root


def build(tmp_path_factory, bundle, profile, folder: str, **kwargs) -> dict[str, Path]:
    from surgery import build_onnx

    return build_onnx(bundle, profile, session_root(tmp_path_factory) / folder, **kwargs)
