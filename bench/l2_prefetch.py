"""`python3 -m bench.l2_prefetch`: do weight-bound GEMMs get faster when their weights are pulled into L2 ahead of them?

A chain of small GEMMs with distinct weights (the decoder's 8x12 shapes) is replayed in a CUDA graph:
- cold: every weight comes from DRAM (several weight sets, rotated);
- hot: the same weights every time (L2-resident: the bound);
- prefetch: cold, plus a side-stream kernel forked at the chain's start that prefetches the chain's weights
  (or the next chain's: lookahead) into L2 while the GEMMs run. Variants: bulk L2 prefetch (`cp.async.bulk.prefetch.L2`,
  one instruction per chunk) and plain loads by a few programs.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engines.torch_fast.conv_tuning import graph_time_us


@triton.jit
def _bulk_prefetch_kernel(ptr, n_bytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    ok = offs < n_bytes
    size = tl.minimum(n_bytes - offs, CHUNK).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,r", [ptr + offs, ok.to(tl.int32), size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _line_prefetch_kernel(ptr, n_bytes, BLOCK: tl.constexpr):
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * 128
    ok = offs < n_bytes
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptr + offs, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _load_kernel(ptr, out_ptr, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(ITERS):
        offs = (pid * ITERS + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def prefetch(flat: torch.Tensor, mode: str, sink: torch.Tensor) -> None:
    """Pull `flat` (uint8 view of contiguous weights) into L2."""
    n = flat.numel()
    if mode == "bulk":
        chunk, block = 16384, 64
        _bulk_prefetch_kernel[(triton.cdiv(n, chunk * block),)](flat, n, CHUNK=chunk, BLOCK=block, num_warps=2)
    elif mode == "lines":
        block = 1024
        _line_prefetch_kernel[(triton.cdiv(n, 128 * block),)](flat, n, BLOCK=block, num_warps=4)
    elif mode == "loads":
        words = flat.view(torch.int32)
        block, programs = 1024, 32
        iters = triton.cdiv(words.numel(), block * programs)
        _load_kernel[(programs,)](words, sink, words.numel(), ITERS=iters, BLOCK=block, num_warps=8)
    else:
        raise ValueError(mode)


def time_graph(fn) -> float:
    """Device time of one call of fn (which may fork onto other streams), replayed in a CUDA graph."""
    return graph_time_us(lambda _: fn, copies=1, repeat=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=192)
    p.add_argument("--k", type=int, default=1280)
    p.add_argument("--n", type=int, default=1280)
    p.add_argument("--chain", type=int, default=8, help="GEMMs a chain (distinct weights)")
    p.add_argument("--sets", type=int, default=8, help="chains a replay (distinct weight sets)")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    x = torch.randn(args.m, args.k, device=dev, dtype=torch.half)
    # one contiguous buffer per chain so one prefetch launch covers it
    bufs = [torch.randn(args.chain, args.n, args.k, device=dev, dtype=torch.half) * 0.03 for _ in range(args.sets)]
    sink = torch.zeros(1 << 20, device=dev, dtype=torch.int32)
    side = torch.cuda.Stream()
    mb = bufs[0].numel() * 2 / 1e6

    def chain(w):
        h = x
        for j in range(args.chain):
            h = F.linear(h, w[j]) if args.k == args.n else F.linear(x, w[j])
        return h

    def cold():
        for w in bufs:
            chain(w)

    def hot():
        for _ in bufs:
            chain(bufs[0])

    def with_prefetch(mode, lookahead):
        def run():
            main_stream = torch.cuda.current_stream()
            if lookahead:  # chain 0's weights before the loop (not timed apart), then chain i+1's during chain i
                side.wait_stream(main_stream)
                with torch.cuda.stream(side):
                    prefetch(bufs[0].view(-1).view(torch.uint8), mode, sink)
                main_stream.wait_stream(side)
            for i, w in enumerate(bufs):
                target = w if not lookahead else (bufs[i + 1] if i + 1 < len(bufs) else None)
                if target is not None:
                    side.wait_stream(main_stream)
                    with torch.cuda.stream(side):
                        prefetch(target.view(-1).view(torch.uint8), mode, sink)
                chain(w)
            main_stream.wait_stream(side)
        return run

    per = args.sets * args.chain
    print(f"chain of {args.chain} GEMMs ({args.m}x{args.k} @ {args.k}x{args.n}), {mb:.1f} MB of weights a chain, "
          f"{args.sets} chains a replay; us a GEMM:", flush=True)
    print(f"  cold {time_graph(cold) / per:6.2f}", flush=True)
    print(f"  hot  {time_graph(hot) / per:6.2f}", flush=True)
    for mode in ("bulk", "lines", "loads"):
        for lookahead in (False, True):
            try:
                t = time_graph(with_prefetch(mode, lookahead)) / per
                print(f"  prefetch {mode:5s} {'next chain' if lookahead else 'own chain ':10s} {t:6.2f}", flush=True)
            except Exception as e:
                print(f"  prefetch {mode} lookahead={lookahead}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    # the prefetch kernels alone, on the main stream: how fast they pull a chain's weights
    for mode in ("bulk", "lines", "loads"):
        try:
            t = time_graph(lambda: [prefetch(w.view(-1).view(torch.uint8), mode, sink) for w in bufs]) / args.sets
            print(f"  {mode:5s} alone: {t:6.2f} us a chain ({mb / t:.2f} TB/s)", flush=True)
        except Exception as e:
            print(f"  {mode} alone: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
