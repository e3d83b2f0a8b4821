"""`python3 -m bench.folded_cross`: the step's cross-attentions, three launches against the folded two.

Per shape of the step (twin and decoder, 8 heads, 77 text tokens), CUDA-graph time per call (rotating inputs, as
the conv tuner times) of:
- the plain form: query GEMM, `sdpa` (our Triton kernel at these sizes), output GEMM;
- the folded form (`folded_cross.attend`): the scores + softmax kernel and the P B GEMM, for each kernel config below;
and the folded output's largest difference from the plain one.
"""

from __future__ import annotations

import sys

import torch

from engines.torch_fast import folded_cross as FC
from engines.torch_fast.conv_tuning import graph_time_us
from engines.torch_fast.triton_attention import sdpa

HEADS = 8
# (name, images of x, images of the text, tokens, channels)
SHAPES = [("twin 32x48 (shared rows)", 2, 4, 1536, 320), ("twin 16x24", 4, 4, 384, 640),
          ("twin 8x12", 4, 4, 96, 1280), ("twin 4x6 (mid)", 4, 4, 24, 1280), ("dec 8x12", 2, 2, 96, 1280),
          ("dec 16x24", 2, 2, 384, 640), ("dec 32x48", 2, 2, 1536, 320)]
# block_m, num_warps, num_stages, block_k
CONFIGS = [(64, 4, 4, 64), (64, 4, 6, 64), (64, 4, 3, 128), (64, 4, 4, 128), (32, 4, 4, 128), (128, 8, 4, 64),
           (64, 8, 4, 128)]
COPIES = 3


def main() -> int:
    dev, dt = torch.device("cuda"), torch.half
    total_plain, total_best = 0.0, 0.0
    for name, nx, nb, tokens, c in SHAPES:
        d = c // HEADS
        g = torch.Generator(dev).manual_seed(0)
        xs = [torch.randn(nx, tokens, c, device=dev, generator=g).to(dt) for _ in range(COPIES)]
        wq = (torch.randn(c, c, device=dev, generator=g) / c ** 0.5).to(dt)
        wo = (torch.randn(c, c, device=dev, generator=g) / c ** 0.5).to(dt)
        k = torch.randn(nb, HEADS, FC.TEXT_TOKENS, d, device=dev, generator=g).to(dt)
        v = torch.randn(nb, HEADS, FC.TEXT_TOKENS, d, device=dev, generator=g).to(dt)
        a, b = FC.fold_matrices(wq, wo, k, v, d ** -0.5)

        def plain(i):
            x = xs[i].repeat_interleave(nb // nx, dim=0)  # outside the timed call: the plain form doubles q instead

            def call():
                q = (x @ wq.t()).reshape(nb, tokens, HEADS, d).transpose(1, 2)
                o = sdpa(q, k, v)
                return o.transpose(1, 2).reshape(nb, tokens, c) @ wo.t()
            return call

        ref = plain(0)().float()
        t_plain = graph_time_us(plain, copies=COPIES)
        line = f"{name:<26} plain {t_plain:6.1f} us  folded"
        best = float("inf")
        for block_m, warps, stages, block_k in CONFIGS:
            def folded(i, block_m=block_m, warps=warps, stages=stages, block_k=block_k):
                return lambda: torch.bmm(FC.scores(xs[i], a, block_m, warps, stages, block_k), b)
            err = (folded(0)().float() - ref).abs().max().item() / ref.abs().max().item()
            us = graph_time_us(folded, copies=COPIES)
            best = min(best, us)
            line += f"  {block_m}/{warps}/{stages}/{block_k} {us:5.1f}"
        p_us = graph_time_us(lambda i: (lambda: FC.scores(xs[i], a)), copies=COPIES)
        print(f"{line}  (scores alone {p_us:.1f}; rel. error {err:.1e})", flush=True)
        total_plain += t_plain
        total_best += best
    print(f"sum over the shapes above: plain {total_plain:.1f} us, folded (best config each) {total_best:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
