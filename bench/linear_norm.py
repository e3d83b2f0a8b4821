"""`python3 -m bench.linear_norm`: the linear + LayerNorm kernel against cuBLAS + Inductor's norm, per shape and tile.

For the step's 320-wide projections that write the residual stream (the decoder's at 32x48, and the twin's at
full and at one-copy batch), this times (CUDA graph, rotating inputs, as the conv tuner times) what the step runs
without the kernel (a torch.compile'd GEMM + bias + residual add + LayerNorm: cuBLAS and one Inductor kernel), and
`linear_norm.linear_norm_kernel` over a set of (BLOCK_M, num_warps, num_stages) tiles, checking each against the
fp32 reference. Session 10 measured the kernel slower in the loop (4 warps, BLOCK_M 64); this is the per-shape
search for a tile that wins (`CNRT_LINEAR_NORM_TILE` sets one for an A/B).
"""

from __future__ import annotations

import sys

import torch

from engines.torch_fast import linear_norm as ln
from engines.torch_fast.conv_tuning import graph_time_us

# (name, groups (0: one nn.Linear-layout weight), rows a group, width)
SHAPES = [("decoder 32x48", 0, 3072, 320), ("twin 32x48", 2, 3072, 320), ("twin 32x48 one copy", 2, 1536, 320)]
TILES = [(64, 4, 3), (64, 8, 3), (64, 4, 2), (32, 4, 3), (32, 2, 3), (16, 2, 3), (16, 1, 3), (128, 8, 3)]
COPIES = 3


def _inputs(groups: int, rows: int, n: int, gen: torch.Generator) -> tuple:
    g = max(groups, 1)
    dev = torch.device("cuda")
    a = torch.randn(*((rows, n) if groups == 0 else (g, rows, n)), device=dev, generator=gen).half()
    if groups == 0:  # an nn.Linear weight (out, in), read transposed as the decoder does
        w = (torch.randn(n, n, device=dev, generator=gen) / n ** 0.5).half().t()
    else:
        w = (torch.randn(g, n, n, device=dev, generator=gen) / n ** 0.5).half()
    vec = (n,) if groups == 0 else (g, n)
    b, nw, nb = (torch.randn(*vec, device=dev, generator=gen).half() for _ in range(3))
    r = torch.randn(*a.shape, device=dev, generator=gen).half()
    return a, w, b, nw, nb, r


def main() -> int:
    gen = torch.Generator("cuda").manual_seed(0)
    unfused = torch.compile(ln.reference, fullgraph=True)
    for name, groups, rows, n in SHAPES:
        sets = [_inputs(groups, rows, n, gen) for _ in range(COPIES)]
        a, w, b, nw, nb, r = sets[0]
        ref_h, ref_n = ln.reference(a.float(), w.float(), b.float(), nw.float(), nb.float(), 1e-5, r.float())
        base = graph_time_us(lambda i: lambda: unfused(*sets[i][:5], 1e-5, sets[i][5]), copies=COPIES)
        line = [f"{name} ({'G=%d, ' % groups if groups else ''}{rows}x{n}): cuBLAS + norm {base:.1f} us"]
        for tile in TILES:
            try:
                h, normed = ln.linear_norm_kernel(a, w, b, nw, nb, 1e-5, r, tile=tile)
                err = max((h.float() - ref_h).abs().max().item(), (normed.float() - ref_n).abs().max().item())
                us = graph_time_us(lambda i, t=tile: lambda: ln.linear_norm_kernel(*sets[i][:5], 1e-5, sets[i][5],
                                                                                     tile=t), copies=COPIES)
            except Exception as e:  # noqa: BLE001 - a tile Triton cannot build (registers, shared memory): go on
                line.append(f"{tile}: failed ({type(e).__name__})")
                continue
            line.append(f"{tile} {us:.1f}" + ("" if err < 5e-2 else f" (error {err:.1e})"))
        print(", ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
