"""`python3 -m bench.group_norm_stages`: silu(group_norm(x)) compiled as the step's parts compile it, with the
statistics in one pass (as the step does now) or in two explicit stages whose second one Inductor unrolls.

Why: compiled, a group norm of the step is three kernels: Inductor splits the statistics into a partial reduction
(`red`) and a final one (`per`, about 1.1 us plus a gap), then the apply. Written as var_mean over R equal runs of
pixels per (image, group) and then Chan's combination of the R (mean, variance) pairs, the combination is a
reduction of R <= 8 elements, which Inductor unrolls into the apply kernel (`unroll_reductions_threshold`): two
kernels. This times both forms per step shape (CUDA graph, rotating inputs) and counts their kernels.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from engines.torch_fast.compile import _inductor_settings
from engines.torch_fast.conv_tuning import graph_time_us
from engines.torch_fast.parts import stacked_group_norm

SHAPES = [(2, 320, 32, 48), (4, 320, 32, 48), (2, 640, 32, 48), (2, 960, 32, 48), (2, 640, 16, 24),
          (4, 640, 16, 24), (2, 1280, 16, 24), (2, 1920, 16, 24), (2, 1280, 8, 12), (4, 1280, 8, 12),
          (2, 2560, 8, 12), (4, 1280, 4, 6), (2, 2560, 4, 6)]


def two_stage_group_norm(x, num_groups, eps, weight, bias, runs: int):
    b, c, height, width = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b, runs, height * width // runs, num_groups, c // num_groups).float()
    var_r, mean_r = torch.var_mean(rows, dim=(2, 4), correction=0, keepdim=True)  # (b, runs, 1, groups, 1)
    mean = mean_r.mean(1, keepdim=True)
    var = var_r.mean(1, keepdim=True) + (mean_r - mean).square().mean(1, keepdim=True)
    y = (rows - mean) * torch.rsqrt(var + eps)
    y = y.reshape(b, height * width, c) * weight.float() + bias.float()
    return y.to(x.dtype).reshape(b, height, width, c).permute(0, 3, 1, 2)


def kernels(fn, x) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default="2,4,8")
    args = p.parse_args(argv)
    _inductor_settings()
    dev = torch.device("cuda")
    runs_list = [int(r) for r in args.runs.split(",")]
    print(f"{'shape':22s} {'1-pass':>12s} " + " ".join(f"{'R=' + str(r):>12s}" for r in runs_list) + "  (us, kernels)")
    totals = [0.0] * (1 + len(runs_list))
    for shape in SHAPES:
        b, c, h, w = shape
        weight = torch.randn(c, device=dev, dtype=torch.half)
        bias = torch.randn(c, device=dev, dtype=torch.half)
        inputs = [(torch.randn(*shape, device=dev, dtype=torch.half) * 3 + 1).contiguous(
            memory_format=torch.channels_last) for _ in range(6)]
        ref = F.silu(F.group_norm(inputs[0].float(), 32, weight.float(), bias.float(), 1e-5))
        fns = [torch.compile(lambda x: F.silu(stacked_group_norm(x, 32, 1e-5, weight, bias)), fullgraph=True)]
        for r in runs_list:
            fns.append(torch.compile(lambda x, r=r: F.silu(two_stage_group_norm(x, 32, 1e-5, weight, bias, r)),
                                     fullgraph=True))
        cells = []
        for i, fn in enumerate(fns):
            r = runs_list[i - 1] if i else 1
            if (h * w) % r:
                cells.append(f"{'-':>12s}")
                continue
            err = (fn(inputs[0]).float() - ref).abs().max().item()
            us = graph_time_us(lambda j, fn=fn: lambda: fn(inputs[j]), copies=len(inputs))
            totals[i] += us
            cells.append(f"{us:6.2f} {kernels(fn, inputs[0]):2d}k{'' if err < 2e-2 else ' ERR%.0e' % err:>3s}")
        print(f"{str(shape):22s} " + " ".join(cells), flush=True)
    print("sum over shapes: " + " ".join(f"{t:.1f}" for t in totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
