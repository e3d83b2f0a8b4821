"""`python3 -m bench.attention_backends`: each SDPA backend on every attention shape of one 256x384 step.

Why: attention is ~10% of the loop's kernel time, and its head sizes (40, 80, 160) are not the powers of two the
fastest kernels are built for. This times cuDNN, flash, memory-efficient and math attention per shape, and our
Triton kernel (`engines/torch_fast/triton_attention.py`, one launch, no memset), each inside a CUDA graph
(conv_tuning.graph_time_us), so the step's choice of backend rests on numbers from this GPU.
Shapes: self-attention over T tokens and cross-attention over 77 text tokens, at the twin encoder's batch (4 = two
networks x CFG 2) and the decoder's (2), heads 8, head size 320*2^level / 8.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engines.torch_fast import triton_attention
from engines.torch_fast.conv_tuning import graph_time_us

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def shapes(height: int, width: int) -> list[tuple[str, int, int, int, int]]:
    """(name, batch, tokens, kv tokens, head size) per attention kind and level; heads are 8."""
    out = []
    for level, channels in enumerate((320, 640, 1280, 1280)):
        t = (height // 8 >> level) * (width // 8 >> level)
        for batch in (4, 2):
            out.append((f"self  L{level} b{batch}", batch, t, t, channels // 8))
            out.append((f"cross L{level} b{batch}", batch, t, 77, channels // 8))
    return out


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--levels", default="0,1,2,3", help="comma-separated levels to time (0: the full latent)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated SDPA backends besides Triton")
    args = p.parse_args(argv)
    levels = {int(v) for v in args.levels.split(",")}
    backends = {n: BACKENDS[n] for n in args.backends.split(",") if n}
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'shape':<18} {'T':>5} {'Tk':>5} {'d':>4} " + " ".join(f"{n:>10}" for n in [*backends, "triton"])
          + "  best triton (BLOCK_M, BLOCK_N, warps, stages)  (us; ! = max abs error >= 1e-2)")
    for name, b, t, tk, d in shapes(args.height, args.width):
        if int(name.split("L")[1][0]) not in levels:
            continue
        q = torch.randn(b, 8, t, d, device=dev, dtype=torch.float16)
        k = torch.randn(b, 8, tk, d, device=dev, dtype=torch.float16)
        v = torch.randn(b, 8, tk, d, device=dev, dtype=torch.float16)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        cells = []
        calls = []
        for backend in backends.values():
            def call(i, backend=backend):
                def run():
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v)
                return run
            calls.append(call)
        for call in calls:
            try:
                err = (call(0)().float() - ref).abs().max().item()
                us = graph_time_us(call, copies=1, repeat=20)
                cells.append(f"{us:>7.1f}{'' if err < 1e-2 else '!':>3}")
            except RuntimeError:
                cells.append(f"{'n/a':>10}")
        best, failure = (float("inf"), None, 0.0), None
        for config in triton_attention.CONFIGS:
            def call(i, config=config):
                return lambda: triton_attention.attention(q, k, v, config)
            try:
                err = (call(0)().float() - ref).abs().max().item()
                best = min(best, (graph_time_us(call, copies=1, repeat=20), config, err))
            except Exception as exc:  # noqa: BLE001 - a config that does not fit this GPU's shared memory
                failure = exc
                continue
        if best[1] is None:
            raise RuntimeError(f"no Triton attention config ran on {name}") from failure
        us, config, err = best
        cells.append(f"{us:>7.1f}{'' if err < 1e-2 else '!':>3}  {config}")
        print(f"{name:<18} {t:>5} {tk:>5} {d:>4} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
