"""`python3 -m bench.linear_kernels`: the transformer blocks' GEMMs on cuBLAS (as the step calls it) against the Triton
TMA kernel (`engines.torch_fast.triton_linear`) over its tiles and K splits, per shape and summed over one step.

Each shape is timed as the conv tuner times (CUDA graph over rotating copies of weights and inputs; enough copies
that the weights do not stay in L2, as in the step, which streams them once). A split config is timed with one
standalone reduction of its partials (`sum(0)`); in the step the sum fuses into the consumer. Every config's result
is checked against cuBLAS first (relative error < 2e-3) and skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from engines.torch_fast import triton_linear as tli
from engines.torch_fast.conv_tuning import graph_time_us

# (level, groups, rows a group, channels, calls a step): the decoder (Linear weights) and the twin (stacked)
LEVELS = [("dec L0", 1, 3072, 320, 3), ("dec L1", 1, 768, 640, 3), ("dec L2", 1, 192, 1280, 3),
          ("twin L0", 2, 3072, 320, 2), ("twin L1", 2, 768, 640, 2), ("twin L2", 2, 192, 1280, 2),
          ("mid", 2, 48, 1280, 1)]
# (GEMM, K / C, N / C, bias, accumulate into c, calls a transformer)
OPS = [("proj_in/out1/out2", 1, 1, True, False, 3), ("q2", 1, 1, False, False, 1), ("qkv", 1, 3, False, False, 1),
       ("ff2", 4, 1, False, True, 1), ("proj_out", 1, 1, False, True, 1)]
L2_BYTES = 50e6


def weight_copies(weight_bytes: int) -> int:
    """Rotating argument sets for a timing: enough that a GEMM's weights come from DRAM, as in the step."""
    return int(min(24, max(3, 2 * L2_BYTES // weight_bytes + 1)))


def cublas_call(groups: int, accumulate: bool, x, w, b, c):
    """The call the step makes for one of these GEMMs: F.linear (or addmm into c) for an nn.Linear weight (N, K),
    bmm (or baddbmm into c) for the twin's stacked (G, K, N) weights, whose biases the consumer adds."""
    if groups == 1:
        return (lambda: torch.addmm(c, x, w.t(), out=c)) if accumulate else (lambda: F.linear(x, w, b))
    return (lambda: torch.baddbmm(c, x, w, out=c)) if accumulate else (lambda: torch.bmm(x, w))


def time_shape(groups: int, m: int, k: int, n: int, bias: bool, acc: bool, log, cublas_only: bool = False) -> dict:
    dev, dt = torch.device("cuda"), torch.half
    copies = weight_copies(groups * k * n * 2)
    gen = torch.Generator(device=dev).manual_seed(0)
    if groups == 1:
        xs = [torch.randn(m, k, device=dev, dtype=dt, generator=gen) for _ in range(copies)]
        ws = [torch.randn(n, k, device=dev, dtype=dt, generator=gen) * k ** -0.5 for _ in range(copies)]
    else:
        xs = [torch.randn(groups, m, k, device=dev, dtype=dt, generator=gen) for _ in range(copies)]
        ws = [torch.randn(groups, k, n, device=dev, dtype=dt, generator=gen) * k ** -0.5 for _ in range(copies)]
    bs = [torch.randn(*([n] if groups == 1 else [groups, n]), device=dev, dtype=dt, generator=gen) if bias else None
          for _ in range(copies)]
    cs = [torch.randn(*xs[0].shape[:-1], n, device=dev, dtype=dt, generator=gen) if acc else None
          for _ in range(copies)]

    # (accumulating: this grows cs, so the reference comes after it)
    base = graph_time_us(lambda i: cublas_call(groups, acc, xs[i], ws[i], bs[i], cs[i]), copies)
    ref = tli.reference(xs[0].float(), ws[0].float(), None if bs[0] is None else bs[0].float(),
                        None if cs[0] is None else cs[0].float())
    best, best_cfg, best_kernel = float("inf"), None, float("inf")
    for cfg in [] if cublas_only else tli.candidate_configs(groups, m, k, n):
        try:
            got = tli.linear(xs[0], ws[0], bs[0], cfg, c=cs[0]).float()
            err = ((got - ref).norm() / ref.norm()).item()
            if not err < 2e-3:
                log(f"  skip {cfg}: relative error {err:.1e}")
                continue
            if cfg.split == 1:
                us = graph_time_us(lambda i, cfg=cfg: lambda: tli.linear(xs[i], ws[i], bs[i], cfg, c=cs[i]), copies)
                kernel_us = us
            else:
                us = graph_time_us(lambda i, cfg=cfg: lambda: tli.linear_partials(xs[i], ws[i], cfg).sum(0), copies)
                kernel_us = graph_time_us(lambda i, cfg=cfg: lambda: tli.linear_partials(xs[i], ws[i], cfg), copies)
        except Exception as e:  # e.g. out of shared memory
            log(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}")
            continue
        if us < best:
            best, best_cfg = us, cfg
        best_kernel = min(best_kernel, kernel_us)
    return {"cublas_us": base, "triton_us": best, "kernel_us": best_kernel,
            "config": None if best_cfg is None else best_cfg.as_dict()}


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="", help="comma-separated level names (default: all)")
    p.add_argument("--json", default="", help="write the per-shape rows here")
    p.add_argument("--cublas-only", action="store_true", help="time cuBLAS only (e.g. under cuBLAS environment "
                   "settings such as TORCH_BLAS_PREFER_CUBLASLT=1 or CUBLASLT_WORKSPACE_SIZE)")
    args = p.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    wanted = set(filter(None, args.levels.split(",")))
    rows, total_old, total_new = [], 0.0, 0.0
    print(f"{'level':8s} {'gemm':18s} {'G':>2s} {'M':>5s} {'K':>5s} {'N':>5s} {'calls':>5s} {'cuBLAS':>7s} "
          f"{'triton':>7s} {'kernel':>7s}  best Triton config (kernel: the fastest config without its reduction)",
          flush=True)
    for level, groups, m, ch, per_level in LEVELS:
        if wanted and level not in wanted:
            continue
        for name, kk, nn_, bias, acc, per_block in OPS:
            k, n = kk * ch, nn_ * ch
            r = time_shape(groups, m, k, n, bias, acc, log, args.cublas_only)
            calls = per_level * per_block
            total_old += calls * r["cublas_us"]
            total_new += calls * min(r["cublas_us"], r["triton_us"])
            rows.append({"level": level, "gemm": name, "groups": groups, "m": m, "k": k, "n": n, "bias": bias,
                         "accumulate": acc, "calls": calls, **r})
            print(f"{level:8s} {name:18s} {groups:2d} {m:5d} {k:5d} {n:5d} {calls:5d} {r['cublas_us']:7.1f} "
                  f"{r['triton_us']:7.1f} {r['kernel_us']:7.1f}  {r['config']}", flush=True)
    print(f"one step: cuBLAS {total_old:.0f} us -> the faster of the two per shape {total_new:.0f} us "
          f"({total_old - total_new:.0f} us a step, {(total_old - total_new) * 20 / 1000:.2f} ms a loop)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
