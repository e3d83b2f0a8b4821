"""`python3 -m bench.profile_step`: where the fused loop's time goes, on the GPU.

Prints the loop time with two streams and with one, the device time of each part of a step alone (each replayed
in its own CUDA graph), how much of one profiled loop some kernel is running, and the heaviest kernels of that loop
grouped by kind (convolution, GEMM, attention, fused Triton, other).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch

from bench import inductor_code
from bench.timing import time_cuda, time_wall
from engines.torch_fast.conv_tuning import graph_time_us
from pipeline.runtime import Canny2ImageRuntime, RuntimeConfig

STEPS = 20  # DDIM steps of the profiled loop
PROMPT = ("a bird", "best quality, extremely detailed", "longbody, lowres, bad anatomy, bad hands, missing fingers")


def kernel_kind(name: str) -> str:
    n = name.lower()
    if n.startswith(("triton_poi_", "triton_red_", "triton_per_")):
        # Inductor's kernels, first: their names list the operators fused in, which may be a convolution's
        # (e.g. `triton_poi_fused_conv2d_launch_silu_0` reads what cnrt::conv2d_launch wrote)
        return "triton (fused elementwise / norm)"
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if "conv" in n or "implicit" in n or "xmma_fprop" in n or "sm90_xmma" in n or "cudnn" in n:
        return "convolution"
    if "gemm" in n or "cutlass" in n or "nvjet" in n or "sm90_" in n:
        return "gemm"
    if "triton" in n:
        return "triton (fused elementwise / norm)"
    return "other"


def write_sequence(path: str, kernels: list) -> None:
    """One line per kernel in start order: start and duration (us), idle gap since the previous kernel ended, name."""
    kernels = sorted(kernels, key=lambda ev: ev.time_range.start)
    t0 = kernels[0].time_range.start if kernels else 0.0
    prev_end = t0
    with open(path, "w") as f:
        for ev in kernels:
            start, end = ev.time_range.start, ev.time_range.end
            f.write(f"{start - t0:10.1f} {end - start:7.1f} {max(0.0, start - prev_end):6.1f}  {ev.name[:140]}\n")
            prev_end = max(prev_end, end)


def print_host_stages(rt, args) -> None:
    """One process() call under torch.profiler: each stage's host time (its NVTX / record_function range) and
    the GPU's idle time inside the call, so the time outside the loop can be attributed."""
    stages = ("preprocess", "text", "hint", "denoise", "decode", "to-host")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.profiler.record_function("process"):
            rt.process(*args)
    events = prof.events()
    ranges = {ev.name: ev.time_range for ev in events if ev.device_type == torch.autograd.DeviceType.CPU
              and ev.name in (*stages, "process")}
    gpu = sorted((ev.time_range.start, ev.time_range.end) for ev in events
                 if ev.device_type == torch.autograd.DeviceType.CUDA)
    total = ranges["process"]
    line = " ".join(f"{n} {(ranges[n].end - ranges[n].start) / 1e3:.3f}" for n in stages if n in ranges)
    print(f"host ms per stage: {line}; process {(total.end - total.start) / 1e3:.2f}")
    if gpu:
        busy_end, idle = gpu[0][0], 0.0
        for start, end in gpu:
            idle += max(0.0, start - busy_end)
            busy_end = max(busy_end, end)
        print(f"GPU: first work {(gpu[0][0] - total.start) / 1e3:.3f} ms after process() began, idle "
              f"{idle / 1e3:.3f} ms between its first and last work, done {(total.end - busy_end) / 1e3:.3f} ms "
              f"before process() returned")


def print_latent_check(rt, x) -> None:
    """The loop's final latent for a fixed x_T: whether graph replays repeat it and eager steps give the same
    bytes (what a variant that only reorders or overlaps kernels, such as PDL, must keep), and its digest. Digests
    of two processes may differ: the GEGLU autotuner may pick another tile in each."""
    replays = [rt.loop(x) for _ in range(3)]
    with torch.no_grad():
        eager = rt.loop.run_eager(x.clone())
    digest = hashlib.sha256(replays[0].cpu().numpy().tobytes()).hexdigest()[:16]
    same = all(torch.equal(r, replays[0]) for r in replays)
    print(f"latent {digest}: replays identical {same}, eager equal {torch.equal(eager, replays[0])} "
          f"(max abs diff {(eager - replays[0]).abs().max().item():.3g})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--compile-mode", default="jit")
    p.add_argument("--weights", default="synthetic")
    p.add_argument("--kernels-out", default=None, help="write every kernel's total time and launches to this file")
    p.add_argument("--sequence-out", default=None,
                   help="write the profiled loop's kernels in launch order (start, duration, gap before, name)")
    p.add_argument("--inductor-code", default=None,
                   help="compile into a fresh Inductor cache directory and write a summary of the generated code "
                        "(bench/inductor_code.py: every launch in order, copies marked; with --sequence-out, first "
                        "the second step's Inductor kernels against their bytes) to this file")
    a = p.parse_args(argv)
    if a.inductor_code:  # read lazily by Inductor: set before anything compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnrt-inductor-")
        import torch._inductor.config as inductor_config
        inductor_config.benchmark_kernel = True  # each kernel's estimated bytes in its source (kernel_num_gb)
    import numpy as np

    rt = Canny2ImageRuntime(RuntimeConfig(weights=a.weights, backend="torch", compile_mode=a.compile_mode))
    image = np.random.default_rng(0).integers(0, 255, (256, 384, 3), dtype=np.uint8)
    args = (image, *PROMPT, 1, 256, STEPS, False, 1, 9, 1, 0.0, 100, 200)
    rt.process(*args)
    x = torch.randn(rt.profile.latent_shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    print_latent_check(rt, x)
    t = time_cuda(lambda: rt.loop(x), runs=10)
    step = rt.engines.step
    print(f"loop (one graph, {'twin encoder' if step.twin is not None else '2 streams'}): {t.median_ms:.2f} ms "
          f"(min {t.min_ms:.2f})")
    print(f"decode {time_cuda(lambda: rt.decode_stage(x), runs=10).median_ms:.3f} ms; "
          f"process() {time_wall(lambda: rt.process(*args), warmup=2, runs=10).median_ms:.2f} ms")
    print_host_stages(rt, args)
    if step.side is not None:
        side, step.side = step.side, None
        rt.loop.reset()
        rt.loop(x)
        t = time_cuda(lambda: rt.loop(x), runs=10)
        print(f"loop (one graph, 1 stream):  {t.median_ms:.2f} ms (min {t.min_ms:.2f})")
        step.side = side
        rt.loop.reset()
        rt.loop(x)
    with torch.no_grad():
        if step.twin is not None:
            parts = {"twin_encoder": lambda: step._twin(x, step.hint_features, step.twin_temb[3], step.twin_kv)}
            mid, skips, controls = parts["twin_encoder"]()
        else:
            parts = {
                "control_branch": lambda: step._cn(x, step.hint_features, step.cn_temb[3], step.cn_kv),
                "unet_encoder": lambda: step._enc(x, step.enc_temb[3], step.enc_kv),
            }
            mid, skips = parts["unet_encoder"]()
            controls = parts["control_branch"]()
    parts["unet_decoder"] = lambda: step._dec(x, mid, list(skips), list(controls), step.control_scales,
                                              step.dec_temb[3], step.dec_kv, step.coeffs[3], step.guidance_scale)
    parts["whole step"] = lambda: step.step(x, 3)
    for name, fn in parts.items():
        with torch.no_grad():
            us = graph_time_us(lambda i, fn=fn: fn, copies=1, repeat=5)
        print(f"part {name:<28} {us / 1e3:7.3f} ms (CUDA-graph replay)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        rt.loop(x)
        torch.cuda.synchronize()
    by_kind = collections.Counter()
    count = collections.Counter()
    by_name = collections.Counter()
    launches = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            by_kind[kernel_kind(ev.name)] += us
            count[kernel_kind(ev.name)] += 1
            by_name[ev.name[:110]] += us
            launches[ev.name[:110]] += 1
    intervals = sorted((ev.time_range.start, ev.time_range.end) for ev in prof.events()
                       if ev.device_type == torch.autograd.DeviceType.CUDA)
    busy, cur_start, cur_end = 0.0, None, None
    for a0, a1 in intervals:
        if cur_end is None or a0 > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = a0, a1
        else:
            cur_end = max(cur_end, a1)
    if cur_end is not None:
        busy += cur_end - cur_start
    span = intervals[-1][1] - intervals[0][0] if intervals else 0.0
    print(f"\none loop under the profiler: {span / 1e3:.1f} ms from first kernel start to last kernel end; some kernel "
          f"running for {busy / 1e3:.1f} ms of it ({100 * busy / max(span, 1e-9):.0f}%), idle {(span - busy) / 1e3:.1f} ms")
    if a.sequence_out:
        write_sequence(a.sequence_out, [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA])
    if a.kernels_out:
        with open(a.kernels_out, "w") as f:
            for name, us in by_name.most_common():
                f.write(f"{us / 1e3:9.3f} ms {launches[name]:6d}  {name}\n")
    total = sum(by_kind.values())
    print(f"\nkernel time in one loop: {total / 1e3:.1f} ms over {sum(count.values())} kernels")
    for kind, us in by_kind.most_common():
        print(f"  {kind:<36} {us / 1e3:7.2f} ms  {100 * us / total:5.1f}%  {count[kind]:6d} kernels")
    print("\ntop kernels:")
    for name, us in by_name.most_common(25):
        print(f"  {us / 1e3:7.2f} ms  {name}")
    print("\nTriton kernels by what Inductor fused into them (words of the kernel name):")
    fused = collections.Counter()
    fused_n = collections.Counter()
    for name, us in by_name.items():
        if name.startswith("triton_"):
            words = "_".join(w for w in name.split("_")[3:] if not w.isdigit())
            fused[words] += us
            fused_n[words] += launches[name]
    for words, us in fused.most_common(15):
        print(f"  {us / 1e3:7.2f} ms  {fused_n[words]:5d} launches  {words[:100]}")
    if a.inductor_code:
        cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        text = inductor_code.summarise(cache)
        if a.sequence_out:  # and the second step's Inductor kernels against their bytes
            try:
                text = inductor_code.sequence_table(cache, Path(a.sequence_out).read_text(), STEPS) + "\n" + text
            except ValueError as e:  # the sequence did not cut into the loop's steps: keep the launch lists
                text = f"(no join with the sequence: {e})\n\n" + text
        Path(a.inductor_code).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
