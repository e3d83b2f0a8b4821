"""`python3 -m bench.geglu_kernels`: the GEGLU GEMM by TMA (the step's kernel) against the pointer kernel, per shape.

For each feed-forward shape of the step this times (CUDA graph, rotating inputs, as the conv tuner times) cuBLAS +
the GELU in eager torch, the pointer-loading kernel (`triton_geglu.geglu_linear`, autotuned), and the TMA variant
(`geglu_linear_tma`: A and weight tiles as bulk tensor copies) over a set of tiles, and checks each result against
the reference. The step runs the TMA variant, autotuned per shape over these tiles (a pre-hook sets the
descriptors' block shapes); `geglu_linear` is the pointer-loading kernel it replaced.

`--epilogue`: what the GELU costs. Per shape, the step's autotuned kernel, then the best TMA tile with the GELU
and the best without it (`gelu=False`: hidden * gate, the same GEMM and stores), summed over one step's calls.

`--early-bias`: per shape, the best TMA tile with the biases added in the epilogue (the step's kernel until the
nineteenth session) and with them loaded before the K loop as the accumulators' initial values (`early_bias=True`,
CNRT_GEGLU_EARLY_BIAS, now the default), and the two results' largest difference, summed over one step's calls.
`--maxnreg`: per shape, the best of the step's tiles against the best of tiles with fewer stages and a register cap
(`MAXNREG_TILES`), so that three programs fit an SM instead of two (the cap makes the compiler spill), and the two
results' largest difference.
"""

from __future__ import annotations

import argparse
import sys

import torch

from engines.torch_fast import triton_geglu as tg
from engines.torch_fast.conv_tuning import graph_time_us

# (name, groups, rows a group, K, N): the twin encoder's (2 groups, stacked weights) and the decoder's (Linear)
SHAPES = [("twin L0", 2, 3072, 320, 1280), ("twin L1", 2, 768, 640, 2560), ("twin L2", 2, 192, 1280, 5120),
          ("mid", 2, 48, 1280, 5120), ("dec L2", 1, 192, 1280, 5120), ("dec L1", 1, 768, 640, 2560),
          ("dec L0", 1, 3072, 320, 1280)]
CALLS_A_STEP = {"twin L0": 2, "twin L1": 2, "twin L2": 2, "mid": 1, "dec L2": 3, "dec L1": 3, "dec L0": 3}
CONFIGS = list(tg.TMA_TILES)  # the tiles the step autotunes over
# 2-stage tiles capped at 168 registers a thread (they need 199-226): three 4-warp programs an SM by registers
# (3 x 168 x 128 <= 65536) and by shared memory (64-80 KB each); compiled on the CPU they spill 42-50 registers
MAXNREG_TILES = [(128, 64, 4, 2, 168), (64, 128, 4, 2, 168), (128, 64, 4, 3, 168), (128, 128, 8, 2, 168)]


def _inputs(g: int, m: int, k: int, n: int):
    """Three rotating (x, weight, bias) sets of one shape: stacked (G, K, 2N) weights for the twin, else Linear."""
    dev = torch.device("cuda")
    if g == 2:
        xs = [torch.randn(g, m, k, device=dev, dtype=torch.half) for _ in range(3)]
        ws = [torch.randn(g, k, 2 * n, device=dev, dtype=torch.half) * 0.02 for _ in range(3)]
        bs = [torch.randn(g, 2 * n, device=dev, dtype=torch.half) for _ in range(3)]
    else:
        xs = [torch.randn(m, k, device=dev, dtype=torch.half) for _ in range(3)]
        ws = [torch.randn(2 * n, k, device=dev, dtype=torch.half) * 0.02 for _ in range(3)]
        bs = [torch.randn(2 * n, device=dev, dtype=torch.half) for _ in range(3)]
    return xs, ws, bs


def _best_tile(xs, ws, bs, n: int, configs=None, **options) -> "tuple[float, tuple | None]":
    """(us, config) of the fastest TMA tile for one shape (among `configs`, default CONFIGS), with
    geglu_linear_tma's keyword options (gelu, early_bias); tiles that do not fit (e.g. out of shared memory) are
    skipped."""
    best = (float("inf"), None)
    for cfg in configs or CONFIGS:
        if cfg[1] > n:
            continue
        try:
            tg.geglu_linear_tma(xs[0], ws[0], bs[0], cfg, **options)
        except Exception:  # e.g. out of shared memory
            continue
        us = graph_time_us(lambda i, cfg=cfg: lambda: tg.geglu_linear_tma(xs[i], ws[i], bs[i], cfg, **options))
        best = min(best, (us, cfg))
    return best


def epilogue() -> int:
    """The step's kernel, the best tile with the GELU and the best without it, per shape and per step."""
    totals = [0.0, 0.0, 0.0]
    for name, g, m, k, n in SHAPES:
        xs, ws, bs = _inputs(g, m, k, n)
        step = graph_time_us(lambda i: lambda: tg.geglu_linear_tma(xs[i], ws[i], bs[i]))
        line, times = f"{name:8} step kernel {step:6.1f} us", [step]
        for gelu in (True, False):
            best = _best_tile(xs, ws, bs, n, gelu=gelu)
            times.append(best[0])
            line += f"   {'with' if gelu else 'without'} GELU {best[0]:6.1f} us {best[1]}"
        for j, t in enumerate(times):
            totals[j] += CALLS_A_STEP[name] * t
        print(line, flush=True)
    print(f"one step's GEGLU calls: step kernel {totals[0]:.0f} us, best tiles with GELU {totals[1]:.0f} us, "
          f"without {totals[2]:.0f} us")
    return 0


def early_bias() -> int:
    """Per shape, the best tile with the biases in the epilogue against the best with them loaded first."""
    totals = [0.0, 0.0]
    for name, g, m, k, n in SHAPES:
        xs, ws, bs = _inputs(g, m, k, n)
        line, outs = f"{name:8}", []
        for j, early in enumerate((False, True)):
            best = _best_tile(xs, ws, bs, n, early_bias=early)
            outs.append(tg.geglu_linear_tma(xs[0], ws[0], bs[0], best[1], early_bias=early).float())
            totals[j] += CALLS_A_STEP[name] * best[0]
            line += f"   bias {'first' if early else 'last '} {best[0]:6.1f} us {best[1]}"
        print(f"{line}   max diff {(outs[0] - outs[1]).abs().max().item():.1e}", flush=True)
    print(f"one step's GEGLU calls: biases in the epilogue {totals[0]:.0f} us, loaded first {totals[1]:.0f} us")
    return 0


def register_cap() -> int:
    """Per shape, the best of the step's tiles against the best register-capped tile (MAXNREG_TILES); a shape no
    capped tile fits keeps the step's tile in the sums."""
    totals = [0.0, 0.0]
    for name, g, m, k, n in SHAPES:
        xs, ws, bs = _inputs(g, m, k, n)
        step = _best_tile(xs, ws, bs, n)
        capped = _best_tile(xs, ws, bs, n, MAXNREG_TILES)
        line = f"{name:8}   step tiles {step[0]:6.1f} us {step[1]}"
        if capped[1] is None:
            line += "   no capped tile fits"
            capped = step
        else:
            diff = (tg.geglu_linear_tma(xs[0], ws[0], bs[0], step[1]).float()
                    - tg.geglu_linear_tma(xs[0], ws[0], bs[0], capped[1]).float()).abs().max().item()
            line += f"   capped {capped[0]:6.1f} us {capped[1]}   max diff {diff:.1e}"
        totals[0] += CALLS_A_STEP[name] * step[0]
        totals[1] += CALLS_A_STEP[name] * min(step[0], capped[0])
        print(line, flush=True)
    print(f"one step's GEGLU calls: step tiles {totals[0]:.0f} us, with a capped tile where faster {totals[1]:.0f} us")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epilogue", action="store_true", help="time the kernel with and without its GELU")
    ap.add_argument("--early-bias", action="store_true",
                    help="time the kernel with its biases added in the epilogue and loaded before the K loop")
    ap.add_argument("--maxnreg", action="store_true",
                    help="time the step's tiles against register-capped tiles that fit three programs an SM")
    args = ap.parse_args(argv)
    if args.maxnreg:
        return register_cap()
    if args.epilogue:
        return epilogue()
    if args.early_bias:
        return early_bias()
    total_old = total_new = 0.0
    for name, g, m, k, n in SHAPES:
        xs, ws, bs = _inputs(g, m, k, n)
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
