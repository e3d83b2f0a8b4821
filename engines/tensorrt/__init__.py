"""The TensorRT backend: ONNX -> static-shape plans -> an EngineSet whose fused step is CUDA-graph capturable.

Importing this package never imports tensorrt: the settings, dtype table and ONNX checks are plain Python, and the
functions below import the TensorRT modules (`builder`, `runtime`) only when called, raising ControlNetRTError with
`tensorrt_available()`'s one-line reason when TensorRT or a GPU is missing.

    ok, why = tensorrt_available()
    plans = build_tensorrt_plans("build/256x384-fp16/onnx", "build/256x384-fp16/tensorrt", profile)
    engines = build_tensorrt_engines("build/256x384-fp16/tensorrt", profile, "cuda")
"""

from __future__ import annotations

from engines.tensorrt.availability import tensorrt_available
from engines.tensorrt.dtypes import TRT_TO_TORCH, torch_dtype
from engines.tensorrt.settings import NETWORKS, BuildOptions, BuildSettings, build_settings
from profiles.errors import ControlNetRTError


def _require_tensorrt() -> None:
    ok, why = tensorrt_available()
    if not ok:
        raise ControlNetRTError(why)


def build_tensorrt_plans(onnx_dir, plan_dir, profile, refit: bool = False, **kwargs):
    """{network: .plan path} for the four networks, rebuilt when stale (see engines.tensorrt.plans)."""
    from engines.tensorrt.plans import build_tensorrt_plans as build

    return build(onnx_dir, plan_dir, profile, refit=refit, **kwargs)


def build_tensorrt_engines(build_dir, profile, device="cuda", **kwargs):
    """engines.base.EngineSet over the plans in build_dir (see engines.tensorrt.runtime)."""
    _require_tensorrt()
    from engines.tensorrt.runtime import build_tensorrt_engines as build

    return build(build_dir, profile, device, **kwargs)


def refit_plan(plan_path, onnx_with_new_weights, out_path=None, verbose: bool = False):
    """Swap a refittable plan's weights for those of a re-exported ONNX file (see engines.tensorrt.builder)."""
    _require_tensorrt()
    from engines.tensorrt.builder import refit_plan as refit

    return refit(plan_path, onnx_with_new_weights, out_path, verbose)


def load_engine(plan_path, device="cuda"):
    """engines.tensorrt.runtime.TrtEngine for one plan."""
    _require_tensorrt()
    from engines.tensorrt.runtime import TrtEngine

    return TrtEngine(plan_path, device)


__all__ = [
    "NETWORKS",
    "TRT_TO_TORCH",
    "BuildOptions",
    "BuildSettings",
    "build_settings",
    "build_tensorrt_engines",
    "build_tensorrt_plans",
    "load_engine",
    "refit_plan",
    "tensorrt_available",
    "torch_dtype",
]
