"""`python3 -m bench.geglu_kernels`: the GEGLU GEMM by TMA (the step's kernel) against the pointer kernel, per shape.

For each feed-forward shape of the step this times (CUDA graph, rotating inputs, as the conv tuner times) cuBLAS +
the GELU in eager torch, the pointer-loading kernel (`triton_geglu.geglu_linear`, autotuned), and the TMA variant
(`geglu_linear_tma`: A and weight tiles as bulk tensor copies) over a set of tiles, and checks each result against
the reference. The step runs the TMA variant, autotuned per shape over these tiles (a pre-hook sets the
descriptors' block shapes); `geglu_linear` is the pointer-loading kernel it replaced.
"""

from __future__ import annotations

import sys

import torch

from engines.torch_fast import triton_geglu as tg
from engines.torch_fast.conv_tuning import graph_time_us

# (name, groups, rows a group, K, N): the twin encoder's (2 groups, stacked weights) and the decoder's (Linear)
SHAPES = [("twin L0", 2, 3072, 320, 1280), ("twin L1", 2, 768, 640, 2560), ("twin L2", 2, 192, 1280, 5120),
          ("mid", 2, 48, 1280, 5120), ("dec L2", 1, 192, 1280, 5120), ("dec L1", 1, 768, 640, 2560),
          ("dec L0", 1, 3072, 320, 1280)]
CALLS_A_STEP = {"twin L0": 2, "twin L1": 2, "twin L2": 2, "mid": 1, "dec L2": 3, "dec L1": 3, "dec L0": 3}
CONFIGS = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 3), (128, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4),
           (64, 64, 4, 4), (64, 64, 4, 6), (64, 256, 8, 3), (256, 64, 8, 3)]


def main() -> int:
    total_old = total_new = 0.0
    for name, g, m, k, n in SHAPES:
        dev = torch.device("cuda")
        if g == 2:
            xs = [torch.randn(g, m, k, device=dev, dtype=torch.half) for _ in range(3)]
            ws = [torch.randn(g, k, 2 * n, device=dev, dtype=torch.half) * 0.02 for _ in range(3)]
            bs = [torch.randn(g, 2 * n, device=dev, dtype=torch.half) for _ in range(3)]
        else:
            xs = [torch.randn(m, k, device=dev, dtype=torch.half) for _ in range(3)]
            ws = [torch.randn(2 * n, k, device=dev, dtype=torch.half) * 0.02 for _ in range(3)]
            bs = [torch.randn(2 * n, device=dev, dtype=torch.half) for _ in range(3)]
        ref = tg.reference(xs[0].float(), ws[0].float(), bs[0].float())
        cublas = graph_time_us(lambda i: lambda: tg.reference(xs[i], ws[i], bs[i]))
        tg.geglu_linear(xs[0], ws[0], bs[0])  # autotunes outside the graph
        old = graph_time_us(lambda i: lambda: tg.geglu_linear(xs[i], ws[i], bs[i]))
        best = (float("inf"), None)
        for cfg in CONFIGS:
            if cfg[1] > n:
                continue
            try:
                got = tg.geglu_linear_tma(xs[0], ws[0], bs[0], cfg).float()
            except Exception as e:  # e.g. out of shared memory
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:100]}")
                continue
            err = ((got - ref).norm() / ref.norm()).item()
            if not err < 3e-3:
                raise RuntimeError(f"{name} {cfg}: relative error {err:.2e}")
            us = graph_time_us(lambda i, cfg=cfg: lambda: tg.geglu_linear_tma(xs[i], ws[i], bs[i], cfg))
            if us < best[0]:
                best = (us, cfg)
        calls = CALLS_A_STEP[name]
        total_old += calls * old
        total_new += calls * min(old, best[0])
        print(f"{name:8} cuBLAS + GELU (eager) {cublas:6.1f} us   pointer kernel {old:6.1f} us   "
              f"TMA best {best[0]:6.1f} us {best[1]}", flush=True)
    print(f"one step's GEGLU calls: {total_old:.0f} us -> {total_new:.0f} us with the faster kernel per shape")
    return 0


if __name__ == "__main__":
    sys.exit(main())
