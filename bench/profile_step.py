"""`python3 -m bench.profile_step`: where the fused loop's time goes, on the GPU.

Prints the loop time under a few runtime switches, the device time of each part of a step alone, and the
heaviest kernels of one captured loop grouped by kind (convolution, GEMM, attention, fused Triton, other).
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch

from bench.timing import time_cuda
from pipeline.runtime import Canny2ImageRuntime, RuntimeConfig

PROMPT = ("a bird", "best quality, extremely detailed", "longbody, lowres, bad anatomy, bad hands, missing fingers")


def kernel_kind(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if "conv" in n or "implicit" in n or "xmma_fprop" in n or "sm90_xmma" in n or "cudnn" in n:
        return "convolution"
    if "gemm" in n or "cutlass" in n or "nvjet" in n or "sm90_" in n:
        return "gemm"
    if "triton" in n:
        return "triton (fused elementwise / norm)"
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--compile-mode", default="jit")
    p.add_argument("--weights", default="synthetic")
    a = p.parse_args(argv)
    import numpy as np

    rt = Canny2ImageRuntime(RuntimeConfig(weights=a.weights, backend="torch", compile_mode=a.compile_mode))
    image = np.random.default_rng(0).integers(0, 255, (256, 384, 3), dtype=np.uint8)
    args = (image, *PROMPT, 1, 256, 20, False, 1, 9, 1, 0.0, 100, 200)
    rt.process(*args)
    x = torch.randn(rt.profile.latent_shape, device="cuda")
    for bench_flag in (False, True):
        torch.backends.cudnn.benchmark = bench_flag
        rt.loop.reset()
        rt.loop(x)
        t = time_cuda(lambda: rt.loop(x), runs=10)
        print(f"loop (one graph), cudnn.benchmark={bench_flag}: {t.median_ms:.2f} ms (min {t.min_ms:.2f})")
    step = rt.engines.step
    parts = {
        "control_branch": lambda: step._cn(x, step.hint_features, step.cn_temb[3], step.cn_kv, step.control_scales),
        "unet_encoder": lambda: step._enc(x, step.enc_temb[3], step.enc_kv),
    }
    mid, skips = step._enc(x, step.enc_temb[3], step.enc_kv)
    controls = step._cn(x, step.hint_features, step.cn_temb[3], step.cn_kv, step.control_scales)
    parts["unet_decoder"] = lambda: step._dec(x, mid, list(skips), list(controls), step.dec_temb[3], step.dec_kv,
                                              step.coeffs[3], step.guidance_scale)
    parts["whole step (2 streams, eager launch)"] = lambda: step.step(x, 3)
    for name, fn in parts.items():
        with torch.no_grad():
            t = time_cuda(fn, runs=20)
        print(f"part {name:<40} {t.median_ms:7.3f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        rt.loop(x)
        torch.cuda.synchronize()
    by_kind = collections.Counter()
    count = collections.Counter()
    by_name = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            by_kind[kernel_kind(ev.name)] += us
            count[kernel_kind(ev.name)] += 1
            by_name[ev.name[:110]] += us
    total = sum(by_kind.values())
    print(f"\nkernel time in one loop: {total / 1e3:.1f} ms over {sum(count.values())} kernels")
    for kind, us in by_kind.most_common():
        print(f"  {kind:<36} {us / 1e3:7.2f} ms  {100 * us / total:5.1f}%  {count[kind]:6d} kernels")
    print("\ntop kernels:")
    for name, us in by_name.most_common(25):
        print(f"  {us / 1e3:7.2f} ms  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
