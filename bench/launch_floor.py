"""`python3 -m bench.launch_floor`: what one small dependent kernel costs inside a CUDA graph, by kind of kernel.

Why: the step's 112 GEMMs take 4-14 us each, and the best Triton TMA kernel is no faster than cuBLAS on any of
them (`bench.linear_kernels`), even with the weights L2-resident (`bench.l2_prefetch`). This times chains of 20
dependent calls (each reads the previous output) for: a trivial Triton copy, cuBLAS, the Triton TMA GEMM and a
Triton GEMM that loads its tiles by pointers, from a tiny shape to the decoder's 8x12 shapes, to see where the floor
of a GEMM launch comes from.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench.l2_prefetch import time_graph
from engines.torch_fast import triton_linear as tli

CHAIN = 20


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


@triton.jit
def _ptr_linear_kernel(a_ptr, w_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N) of the (N, K) weight
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(a_ptrs, mask=(offs_m < M)[:, None], other=0.0), tl.load(w_ptrs), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.float16), mask=(offs_m < M)[:, None])


def chain_us(step, x0) -> float:
    def run():
        h = x0
        for _ in range(CHAIN):
            h = step(h)
    return time_graph(run) / CHAIN


def main() -> int:
    dev = torch.device("cuda")
    x = torch.randn(128, device=dev)
    print(f"triton copy of 128 floats: {chain_us(lambda h: _launch_copy(h), x):.2f} us a call", flush=True)
    for m, k in ((64, 64), (128, 128), (192, 1280), (768, 640), (3072, 320)):
        a = torch.randn(m, k, device=dev, dtype=torch.half)
        w = torch.randn(k, k, device=dev, dtype=torch.half) * k ** -0.5
        row = [f"{m}x{k}@{k}x{k}:", f"cuBLAS {chain_us(lambda h: F.linear(h, w), a):5.2f}"]
        for bm, bn, warps, stages in ((64, 64, 4, 4), (128, 64, 4, 4)):
            cfg = tli.LinearConfig(bm, min(bn, k), warps, stages, 1)
            row.append(f"tma{bm}x{cfg.block_n} {chain_us(lambda h: tli.linear(h, w, None, cfg), a):5.2f}")
            row.append(f"ptr{bm}x{cfg.block_n} {chain_us(lambda h: _launch_ptr(h, w, bm, cfg.block_n, warps, stages), a):5.2f}")
        print("  ".join(row), flush=True)
    return 0


def _launch_copy(x):
    y = torch.empty_like(x)
    _copy_kernel[(1,)](x, y, x.numel(), BLOCK=128)
    return y


def _launch_ptr(a, w, bm, bn, warps, stages):
    m, k = a.shape
    n = w.shape[0]
    out = torch.empty(m, n, device=a.device, dtype=a.dtype)
    _ptr_linear_kernel[(triton.cdiv(m, bm), n // bn)](a, w, out, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64,
                                                      num_warps=warps, num_stages=stages)
    return out


if __name__ == "__main__":
    sys.exit(main())
