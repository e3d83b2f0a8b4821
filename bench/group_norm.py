"""`python3 -m bench.group_norm`: the one-kernel Triton GroupNorm + SiLU against Inductor's, per step shape.

For each group-norm shape of the step this times (CUDA graph, rotating inputs, as the conv tuner times) the code the
step ran before (`parts.stacked_group_norm` + SiLU, compiled by Inductor: two or three kernels) and
`triton_group_norm.group_norm_nhwc` (one launch with a grid barrier), and checks both against the fp32 reference.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from engines.torch_fast import triton_group_norm as tgn
from engines.torch_fast.conv_tuning import graph_time_us
from engines.torch_fast.parts import stacked_group_norm

# (images, channels, height, width, stacked affines): the twin encoder's (batch 4, two networks) and the decoder's
SHAPES = [(4, 320, 32, 48, 2), (2, 960, 32, 48, 1), (2, 640, 32, 48, 1), (4, 640, 16, 24, 2), (2, 1920, 16, 24, 1),
          (4, 1280, 8, 12, 2), (2, 2560, 4, 6, 1)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=f"{tgn.BARRIER}:{tgn.ONE_TILE_ELEMENTS}",
                    help="comma-separated BARRIER:ONE_TILE_ELEMENTS pairs of the Triton kernel to time (barrier 0: "
                         "two launches; 1: atomics-polled words; 2: one word, volatile polls)")
    variants = [tuple(int(v) for v in pair.split(":")) for pair in ap.parse_args(argv).variants.split(",")]
    dev = torch.device("cuda")
    total_old = 0.0
    total_new = [0.0] * len(variants)
    for b, c, h, w, stacks in SHAPES:
        torch.manual_seed(0)
        xs = [(torch.randn(b, c, h, w, device=dev) * 2 + 0.5).half().contiguous(memory_format=torch.channels_last)
              for _ in range(3)]
        weight = (torch.rand(stacks, c, device=dev) + 0.5).half().squeeze(0)
        bias = torch.randn(weight.shape, device=dev).half()
        ref = tgn.reference(xs[0], 32, 1e-5, weight, bias, True).float()

        @torch.compile(fullgraph=True, dynamic=False)
        def inductor(x):
            return F.silu(stacked_group_norm(x, 32, 1e-5, weight, bias))

        err_old = (inductor(xs[0]).float() - ref).abs().max().item()
        old = graph_time_us(lambda i: lambda: inductor(xs[i]))
        total_old += old
        line = f"{b}x{c}x{h}x{w} (affines {stacks}): Inductor {old:6.2f} us (max err {err_old:.1e})"
        for n, (barrier, one_tile) in enumerate(variants):
            tgn.BARRIER, tgn.ONE_TILE_ELEMENTS = barrier, one_tile
            site = 100 + n  # each variant its own barrier words

            def run(x, site=site):
                return tgn.group_norm_nhwc(x, 32, 1e-5, weight, bias, True, site=site)

            err = (run(xs[0]).float() - ref).abs().max().item()
            new = graph_time_us(lambda i, run=run: lambda: run(xs[i]))
            total_new[n] += new
            p = tgn.plan(b, h * w, c, 32, torch.cuda.get_device_properties(dev).multi_processor_count,
                         one_tile_elements=one_tile)
            line += (f" | {barrier}:{one_tile} {new:6.2f} us ({err:.1e}; {b * p['programs_per_image']}x"
                     f"{p['rows_per_program']} rows{', 1 tile' if p['one_tile'] else ''})")
        print(line, flush=True)
    print(f"sum of the shapes above: Inductor {total_old:.1f} us; Triton " + ", ".join(
        f"{b}:{t} {total:.1f} us" for (b, t), total in zip(variants, total_new)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
