"""`python3 -m bench.persistent_chain`: does a phase behind a grid barrier cost less than a kernel launch?

Why: the deep levels (8x12 and 4x6 maps, M = 192 / 48 rows a GEMM) are chains of weight-bound GEMMs, each one
launch of about 5 us for about 1.1 us of weight bytes (bench/NOTES.md, twelfth session), and the biggest lever left
on the list since then is one persistent kernel per transformer block, with grid barriers between its GEMMs. That
lever rests on one premise, measured here on the simplest chain: X[p + 1] = X[p] @ W[p]^T for P phases with
distinct (N, K) weights, as the step's nn.Linear layers hold them.

Variants, each replayed in a CUDA graph over three weight sets (so the weights come from DRAM, as in the step):
- `cublas`: P torch.mm calls;
- `launches`: P launches of the tile kernel below, one phase each;
- `persistent`: one launch of the same kernel for all P phases, programs = min(tiles, SMs), a grid barrier
  (one arrival word, as the seventh session's group norm had) between phases;
- `persistent+prefetch`: the same, each program asking L2 for its next phase's weight rows
  (`cp.async.bulk.prefetch.L2`, one instruction: a tile's rows are contiguous) before it waits at the barrier.
Every Triton variant must give the same bytes as `launches`; cuBLAS is compared with a tolerance.
"""

from __future__ import annotations

import argparse
import sys

import torch

from engines.torch_fast.conv_tuning import graph_time_us

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the script needs a GPU anyway
    triton = tl = None

if triton is not None:

    @triton.jit
    def _grid_barrier(sync_ptr):
        """Every program waits until all have arrived. One int32 word: (generation << 16) | arrivals; the last
        arrival resets the count and bumps the generation, so the word never needs clearing between launches."""
        tl.debug_barrier()  # the program's stores are issued before its arrival
        old = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
        if (old & 0xFFFF) == tl.num_programs(0) - 1:
            tl.atomic_add(sync_ptr, 0x10000 - tl.num_programs(0), sem="release")
        else:
            current = tl.load(sync_ptr, volatile=True)
            while (current >> 16) == (old >> 16):
                current = tl.load(sync_ptr, volatile=True)
            tl.atomic_add(sync_ptr, 0, sem="acquire")  # orders the next phase's loads after the barrier
        tl.debug_barrier()

    @triton.jit
    def _prefetch_l2(ptr, n_bytes):
        lane = tl.arange(0, 32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
            "=r,l,r,r", [ptr + lane * 0, (lane == 0).to(tl.int32), n_bytes + lane * 0], dtype=tl.int32,
            is_pure=False, pack=1)

    @triton.jit
    def _chain_kernel(x_ptr, w_ptr, sync_ptr, M, N, K, P0, P_END, TILES_N: tl.constexpr, NUM_TILES: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREFETCH: tl.constexpr):
        """Phases P0 .. P_END - 1 of the chain. x: ((P + 1) * M, K) rows, phase p reads block p and writes block
        p + 1 (N == K); w: (P * N, K). With more than one phase the grid must be co-resident (a barrier joins them)."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        offs_k = tl.arange(0, BLOCK_K)
        for p in range(P0, P_END):
            for t in range(pid, NUM_TILES, nprog):
                offs_m = (t // TILES_N) * BLOCK_M + tl.arange(0, BLOCK_M)
                offs_n = (t % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
                m_ok = offs_m < M
                a_ptrs = x_ptr + (p * M + offs_m)[:, None] * K + offs_k[None, :]
                w_ptrs = w_ptr + (p * N + offs_n)[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N) of W^T
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for _ in range(0, K, BLOCK_K):
                    a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")  # L2: written this launch
                    acc = tl.dot(a, tl.load(w_ptrs), acc)
                    a_ptrs += BLOCK_K
                    w_ptrs += BLOCK_K
                tl.store(x_ptr + ((p + 1) * M + offs_m)[:, None] * K + offs_n[None, :], acc.to(tl.float16),
                         mask=m_ok[:, None])
            if p + 1 < P_END:
                if PREFETCH:
                    for t in range(pid, NUM_TILES, nprog):
                        row = (p + 1) * N + (t % TILES_N) * BLOCK_N
                        _prefetch_l2(w_ptr + row.to(tl.int64) * K, BLOCK_N * K * 2)
                _grid_barrier(sync_ptr)


def run_chain(x, w, sync, m, n, k, phases, tile, mode, sms):
    block_m, block_n, warps, stages = tile
    tiles_n = n // block_n
    tiles = triton.cdiv(m, block_m) * tiles_n
    common = dict(TILES_N=tiles_n, NUM_TILES=tiles, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64,
                  num_warps=warps, num_stages=stages)
    if mode == "launches":
        for p in range(phases):
            _chain_kernel[(tiles,)](x, w, sync, m, n, k, p, p + 1, PREFETCH=False, **common)
    else:
        _chain_kernel[(min(tiles, sms),)](x, w, sync, m, n, k, 0, phases, PREFETCH=mode == "persistent+prefetch",
                                          **common)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", type=int, default=8)
    ap.add_argument("--rows", default="192,48", help="M values (the 8x12 and 4x6 levels at CFG batch 2)")
    ap.add_argument("--width", type=int, default=1280)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    tiles = [(64, 32, 4, 4), (64, 32, 4, 6), (64, 64, 4, 4), (32, 32, 4, 6), (64, 16, 4, 6), (16, 32, 4, 6)]
    n = k = a.width
    p = a.phases
    copies = 3
    print(f"{torch.cuda.get_device_name(dev)}; chain of {p} GEMMs (M x {k}) @ ({k} x {n}), weights cold; "
          f"time per phase (us)", flush=True)
    for m in (int(v) for v in a.rows.split(",")):
        g = torch.Generator(device=dev).manual_seed(0)
        ws = [(torch.randn(p * n, k, device=dev, generator=g) / k ** 0.5).half() for _ in range(copies)]
        xs = [torch.zeros((p + 1) * m, k, device=dev, dtype=torch.half) for _ in range(copies)]
        for x in xs:
            x[:m] = torch.randn(m, k, device=dev, generator=g).half()
        sync = torch.zeros(copies, device=dev, dtype=torch.int32)

        def torch_chain(i):
            h = xs[i][:m]
            for q in range(p):
                h = torch.mm(h, ws[i][q * n:(q + 1) * n].t())
            return h

        ref = torch_chain(0).float()
        us = graph_time_us(lambda i: lambda: torch_chain(i), copies=copies, repeat=5) / p
        print(f"M={m:4d} cublas {us:6.2f}", flush=True)
        for tile in tiles:
            line = f"M={m:4d} tile {tile}:"
            base = None
            for mode in ("launches", "persistent", "persistent+prefetch"):
                try:
                    for x in xs:
                        x[m:] = 0
                    run_chain(xs[0], ws[0], sync[0:1], m, n, k, p, tile, mode, sms)
                    out = xs[0][p * m:].clone()
                    if base is None:
                        base = out
                        err = ((out.float() - ref).norm() / ref.norm()).item()
                        line += (" (the same bytes as cuBLAS)" if torch.equal(out.float(), ref)
                                 else f" (relative error against cuBLAS {err:.1e})")
                    elif not torch.equal(out, base):
                        line += f" {mode} DIFFERENT BYTES;"
                        continue
                    t = graph_time_us(lambda i, mode=mode: lambda: run_chain(
                        xs[i], ws[i], sync[i:i + 1], m, n, k, p, tile, mode, sms), copies=copies, repeat=5) / p
                    line += f" {mode} {t:6.2f}"
                except Exception as e:  # e.g. out of resources
                    line += f" {mode} {type(e).__name__}: {str(e)[:80]}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
