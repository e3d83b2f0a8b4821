"""`python3 -m bench.gluon_attention`: the 32x48 self-attentions on cuDNN, our Triton kernel and the Gluon kernel.

Why: those five calls are the largest attention cost of a step (bench/NOTES.md). At d = 40 the Triton kernel
leaves the tensor cores idle during the softmax; the Gluon kernel (`engines/torch_fast/gluon_attention.py`) gives
the softmax and the products separate warpgroups. This times each on the step's inputs (head-split views
of one fused Q/K/V product, as `twin.py` and `parts.py` make them), in CUDA graphs, and checks each against the
fp32 reference; the Gluon kernel for each of its configs, and whether two of its runs give the same bytes.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engines.torch_fast import gluon_attention, triton_attention
from engines.torch_fast.conv_tuning import graph_time_us
from engines.torch_fast.parts import _heads

HEADS = 8
# (name, batch, tokens, head size): the twin's first block runs its self-attention at one row per network
# (batch 2), its second at batch 4; the decoder's three at batch 2.
SHAPES = (("twin L0 b4", 4, 1536, 40), ("L0 b2", 2, 1536, 40))


def step_inputs(batch: int, tokens: int, d: int, copies: int, generator: "torch.Generator | None" = None
                ) -> list[tuple[torch.Tensor, ...]]:
    """`copies` sets of (q, k, v) on the GPU: (B, H, T, d) views of one (B, T, 3 * H * d) product, split by the
    step's own helper (`parts._heads`)."""
    out = []
    for _ in range(copies):
        qkv = torch.randn(batch, tokens, 3 * HEADS * d, device="cuda", generator=generator).half()
        out.append(tuple(_heads(t, HEADS) for t in qkv.chunk(3, dim=-1)))
    return out


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=4, help="rotating input sets per timing")
    args = p.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  (us a call; max abs error against fp32)")
    for name, b, t, d in SHAPES:
        sets = step_inputs(b, t, d, args.copies)
        q, k, v = sets[0]
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())

        def cudnn(i):
            def run():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(*sets[i])
            return run

        rows = [("cudnn", cudnn, None), ("triton", lambda i: lambda: triton_attention.attention(*sets[i]), None)]
        for config in gluon_attention.CONFIGS:
            rows.append((f"gluon {config}", lambda i, c=config: lambda: gluon_attention.attention(*sets[i], config=c),
                         config))
        for label, make, config in rows:
            try:
                out = make(0)()
                err = (out.float() - ref).abs().max().item()
                same = "" if config is None else (", same bytes twice" if torch.equal(out, make(0)()) else
                                                  ", BYTES DIFFER between runs")
                us = graph_time_us(make, copies=args.copies, repeat=20)
                print(f"{name:<11} {label:<26} {us:7.1f} us  err {err:.1e}{same}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a config that does not fit, reported and skipped
                print(f"{name:<11} {label:<26} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
