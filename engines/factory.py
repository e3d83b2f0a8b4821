"""Backend choice: (backend, weights, profile, device) -> EngineSet.

`auto` picks TensorRT when it is importable and a GPU is present, else torch on the GPU, else the CPU reference.
Backend modules are imported only when chosen, so a machine without TensorRT or onnxruntime runs the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engines.base import EngineSet
from models.bundle import ModelBundle
from profiles.config import Backend, Precision, Profile
from profiles.errors import ControlNetRTError


def resolve_backend(backend: "str | Backend", device: torch.device) -> Backend:
    backend = Backend.parse(backend)
    if backend is not Backend.AUTO:
        return backend
    if device.type == "cuda":
        from engines.tensorrt import tensorrt_available

        return Backend.TENSORRT if tensorrt_available()[0] else Backend.TORCH
    return Backend.TORCH


def create_engines(backend: Backend, bundle: ModelBundle, profile: Profile, device: torch.device,
                   build_dir: Path, compile_mode: str = "auto") -> EngineSet:
    if backend is Backend.TORCH:
        if profile.precision is Precision.FP32:
            from engines.torch_eager import build_eager_engines

            return build_eager_engines(bundle, profile, device)
        if device.type != "cuda":
            raise ControlNetRTError(f"profile {profile.name} is fp16, which needs a CUDA GPU: on CPU use a -fp32 "
                                    "profile (e.g. 256x384-fp32)")
        from engines.torch_fast import build_fast_engines

        return build_fast_engines(bundle, profile, device, build_dir / "torch", compile_mode=compile_mode)
    if backend is Backend.ONNXRUNTIME:
        if device.type != "cpu":
            raise ControlNetRTError("the onnxruntime backend runs on CPU only: pass device='cpu'")
        from engines.onnxruntime_backend import build_onnxruntime_engines
        from surgery.build import build_onnx

        onnx_dir = build_dir / "onnx"
        build_onnx(bundle, profile, onnx_dir)
        return build_onnxruntime_engines(onnx_dir, profile, bundle)
    if backend is Backend.TENSORRT:
        from engines.tensorrt import build_tensorrt_engines, tensorrt_available
        from surgery.build import build_onnx

        ok, why = tensorrt_available()
        if not ok:
            raise ControlNetRTError(why)
        build_onnx(bundle, profile, build_dir / "onnx")
        return build_tensorrt_engines(build_dir / "tensorrt", profile, device, onnx_dir=build_dir / "onnx",
                                      weights_id=bundle.weights_id)
    raise ControlNetRTError(f"backend {backend.value!r} cannot create engines")
