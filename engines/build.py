"""`python3 -m engines.build`: build every artifact one profile needs, once (preprocess.sh calls this).

Artifacts land in build/<profile>/ with manifests; a rerun with nothing changed reuses them. Which ones depends on
the backend the runtime will pick: torch on a GPU -> AOTInductor packages of the fast step's parts and the VAE
decoder; tensorrt -> fp16 ONNX + .plan files; onnxruntime -> ONNX. `--onnx` also exports the ONNX graphs.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from profiles.config import Backend, Precision
from profiles.errors import ControlNetRTError


def _log(msg: str) -> None:
    print(f"[build] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from pipeline.runtime import RuntimeConfig

    p = argparse.ArgumentParser(prog="python3 -m engines.build", description=__doc__)
    p.add_argument("--weights", help="weights source (default: CNRT_WEIGHTS, else synthetic on GPU, "
                                     "synthetic-tiny on CPU)")
    p.add_argument("--profile", help="profile (default: CNRT_PROFILE, else 256x384-fp16 on GPU, 256x384-fp32 on CPU)")
    p.add_argument("--backend", help="auto | torch | onnxruntime | tensorrt")
    p.add_argument("--device", help="auto | cuda | cpu")
    p.add_argument("--compile-mode", help="torch backend: auto | aoti | jit | eager")
    p.add_argument("--onnx", action="store_true", help="also export the profile's ONNX graphs (surgery/)")
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    defaults = {} if gpu else {"weights": "synthetic-tiny", "profile": "256x384-fp32"}
    config = RuntimeConfig.from_env(**{**defaults, **{k: v for k, v in dict(
        weights=a.weights, profile=a.profile, backend=a.backend, device=a.device,
        compile_mode=a.compile_mode).items() if v}})
    try:
        build(config, onnx=a.onnx)
    except ControlNetRTError as exc:
        print(f"engines.build: error: {exc}", file=sys.stderr)
        return 1
    return 0


def build(config, onnx: bool = False) -> None:
    from engines.factory import resolve_backend
    from models import load_bundle
    from profiles.config import get_profile

    start = time.perf_counter()
    profile = get_profile(config.profile)
    device = config.resolved_device()
    backend = resolve_backend(config.backend, device)
    _log(f"profile {profile.name}, backend {backend.value}, device {device}, weights {config.weights}")
    bundle = load_bundle(config.weights, cache_root=config.build_root / "weights")
    _log(f"weights ready ({bundle.weights_id}) at {time.perf_counter() - start:.0f} s")
    build_dir = config.build_root / profile.name
    if onnx or backend in (Backend.ONNXRUNTIME, Backend.TENSORRT):
        from surgery.build import build_onnx

        t0 = time.perf_counter()
        build_onnx(bundle, profile, build_dir / "onnx")
        _log(f"ONNX ready in {time.perf_counter() - t0:.0f} s")
    if backend is Backend.TENSORRT:
        from engines.tensorrt import build_tensorrt_plans

        t0 = time.perf_counter()
        build_tensorrt_plans(build_dir / "onnx", build_dir / "tensorrt", profile, weights_id=bundle.weights_id)
        _log(f"TensorRT plans ready in {time.perf_counter() - t0:.0f} s")
    elif backend is Backend.TORCH and profile.precision is Precision.FP16 and device.type == "cuda":
        from engines.torch_fast import build_fast_engines

        t0 = time.perf_counter()
        build_fast_engines(bundle, profile, device, build_dir / "torch", compile_mode=config.compile_mode)
        _log(f"torch engine ready in {time.perf_counter() - t0:.0f} s")
    from scoring.images import ensure_test_images

    ensure_test_images(config.build_root / "test_images", profile.height, profile.width)
    _log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
