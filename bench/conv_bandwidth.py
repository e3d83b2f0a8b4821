"""`python3 -m bench.conv_bandwidth`: how close the deep (weight-bound) 3x3 convolutions get to HBM bandwidth.

At levels 2-3 (8x12 and 4x6 latents, M = 48..192 rows a group) each convolution streams 29-59 MB of weights
for little arithmetic, so its floor is bytes / bandwidth. This probe times the step's Triton kernel as the tuner
does (kernel + one reduction of the split-K partials) over a wider config space than the tuner's, and prints the
weight bandwidth achieved against a plain read and a copy of the same bytes.

Measured on an H200 (bench/NOTES.md): the 4x6 convolutions reach about 3.2 TB/s with 64x128 5-stage tiles, which
the tuner now tries. A copy of the kernel with tile-blocked weights, or with an evict-first hint on the weight
stream, gained at most 5% at 8x12 and nothing at 4x6, so neither was kept. On an H100 (session 16) they reach
2.15 TB/s, torch's own `sum` 2.2 and a plain Triton read with 2112 programs 2.73 (`read_roofline`; `--read-only`
runs only the reads).

`--cache TABLE` (a conv tuning table, e.g. build/256x384-fp16/torch/<gpu>/conv_tuning.json): for each shape the
table runs on Triton, the table's config with its weights from DRAM (three rotating sets) and hot in L2 (one set),
torch's `sum` of the same weight bytes, and cuBLAS's batched GEMM over a materialised im2col (the GEMM alone). The
nineteenth session's question: is a deep convolution bound by its weights' DRAM traffic? On an H100 it was not:
L2-hot weights gave the same times (bench/NOTES.md).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from engines.torch_fast.conv_tuning import graph_time_us
from engines.torch_fast.triton_conv import ConvConfig, conv2d_nhwc, output_size

# (block_m, block_n, warps, stages); the 6-8 stage tiles (deeper than the tuner's) ask whether more weight bytes in
# flight per SM raise the bandwidth
TILES = [(64, 64, 4, 4), (64, 64, 4, 6), (64, 64, 4, 8), (64, 128, 4, 4), (64, 128, 4, 5), (64, 128, 4, 6),
         (64, 128, 4, 7), (64, 128, 8, 4), (64, 256, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3)]
SHAPES = [  # (groups, batch, Cin, H, W, Cout): the twin's and the decoder's 4x6 and 8x12 convolutions
    (2, 2, 1280, 4, 6, 1280), (1, 2, 2560, 4, 6, 1280), (2, 2, 1280, 8, 12, 1280), (1, 2, 2560, 8, 12, 1280)]
CACHE_SHAPES = SHAPES + [(1, 2, 1280, 8, 12, 1280)]  # --cache adds the decoder's 8x12 conv2 (28 MiB: fits L2)


@triton.jit
def _stream_read(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Each program reads every num_programs-th BLOCK of x and stores one number: a read-only stream."""
    pid, step = tl.program_id(0), tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, step * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def read_roofline(bufs: list, nbytes: int) -> None:
    """The read-only bandwidth a plain Triton stream reaches over these buffers, for a few grid sizes."""
    out = torch.empty(132 * 16, device=bufs[0].device, dtype=torch.float32)
    for programs, block, warps in ((132, 4096, 8), (264, 4096, 8), (528, 2048, 4), (1056, 2048, 4),
                                   (2112, 1024, 4)):
        us = graph_time_us(lambda i, p=programs, b=block, w=warps: lambda: _stream_read[(p,)](
            bufs[i], out, bufs[i].numel(), BLOCK=b, num_warps=w))
        print(f"  Triton read, {programs} programs of {block}: {us:.1f} us = {nbytes / us / 1e6:.2f} TB/s", flush=True)


def cache_and_cublas(table_path: str) -> None:
    """The table's Triton config per deep shape: weights cold and L2-hot, against a plain read of the same bytes
    and cuBLAS over a materialised im2col."""
    from engines.torch_fast.conv_tuning import TuningTable
    from engines.torch_fast.triton_conv import weight_matrix

    dev = torch.device("cuda")
    table = TuningTable.load(table_path)
    for g, n, c, h, w, cout in CACHE_SHAPES:
        key = f"{n}x{c}x{h}x{w}->{cout} k3 s1 p1" + (f" g{g}" if g > 1 else "")
        choice = table.choices.get(key)
        if choice is None or choice.backend != "triton":
            print(f"{key}: not on Triton in the table", flush=True)
            continue
        cfg = choice.config
        xs = [torch.randn(g * n, c, h, w, device=dev, dtype=torch.float16)
              .contiguous(memory_format=torch.channels_last) for _ in range(3)]
        mats = [weight_matrix(torch.randn(g, cout, c, 3, 3, device=dev, dtype=torch.float16) * 0.01)
                for _ in range(3)]
        mats = [m if g > 1 else m[0] for m in mats]  # one group: the (K, Cout) matrix the step passes
        mib = mats[0].numel() * 2 / 2 ** 20

        def conv(i):
            return lambda: conv2d_nhwc(xs[i], mats[i], None, 3, 1, 1, cfg, groups=g, sum_only=True)

        cold, hot = graph_time_us(conv), graph_time_us(conv, copies=1)
        read = graph_time_us(lambda i: lambda: mats[i].sum(dtype=torch.float32))
        cols = [torch.randn(g, n * h * w, 9 * c, device=dev, dtype=torch.float16) for _ in range(3)]
        cublas = graph_time_us(lambda i: lambda: torch.bmm(cols[i], mats[i].reshape(g, 9 * c, cout)))
        print(f"{key} ({mib:.0f} MiB of weights), {cfg}: cold {cold:.1f} us, L2-hot {hot:.1f} us; "
              f"torch sum of the weights {read:.1f} us; cuBLAS over an im2col {cublas:.1f} us", flush=True)


def main() -> None:
    if "--cache" in sys.argv:
        return cache_and_cublas(sys.argv[sys.argv.index("--cache") + 1])
    dev = torch.device("cuda")
    torch.manual_seed(0)
    nbytes = 59 * 2 ** 20
    bufs = [torch.empty(nbytes // 2, device=dev, dtype=torch.float16).normal_() for _ in range(3)]
    read_us = graph_time_us(lambda i: lambda: bufs[i].sum(dtype=torch.float32))
    copy_us = graph_time_us(lambda i: lambda: bufs[i].clone())
    print(f"read 59 MiB: {read_us:.1f} us = {nbytes / read_us / 1e6:.2f} TB/s; "
          f"copy: {copy_us:.1f} us = {2 * nbytes / copy_us / 1e6:.2f} TB/s (read + write)", flush=True)
    read_roofline(bufs, nbytes)
    if "--read-only" in sys.argv:
        return
    for g, n, c, h, w, cout in SHAPES:
        oh, ow = output_size(h, w, 3, 1, 1)
        m = g * n * oh * ow
        k_steps = 9 * c // 64
        xs = [torch.randn(g * n, c, h, w, device=dev, dtype=torch.float16)
              .contiguous(memory_format=torch.channels_last) for _ in range(3)]
        mats = [torch.randn(g, 9 * c, cout, device=dev, dtype=torch.float16) * 0.02 for _ in range(3)]
        wbytes = mats[0].numel() * 2
        timed = []
        for bm, bn, warps, stages in TILES:
            if (bm > 64 and m <= 64 * g) or cout % bn:
                continue
            tiles = -(-m // (g * bm)) * (cout // bn)
            for split in range(1, k_steps + 1):
                if k_steps % split or k_steps // split < 4 or tiles * split * g > 8 * 132:
                    continue
                cfg = ConvConfig(bm, bn, 64, split, warps, stages)
                us = graph_time_us(lambda i, cfg=cfg: lambda: conv2d_nhwc(xs[i], mats[i], None, 3, 1, 1, cfg,
                                                                          groups=g, sum_only=True))
                timed.append((us, cfg))
        timed.sort(key=lambda t: t[0])
        print(f"{g}x[{n}x{c}x{h}x{w}->{cout}] weights {wbytes / 2 ** 20:.0f} MiB, M {m // g} a group, "
              f"{len(timed)} configs; the best three:", flush=True)
        for us, cfg in timed[:3]:
            print(f"    {us:.1f} us = {wbytes / us / 1e6:.2f} TB/s, {2 * m * cout * 9 * c / us / 1e6:.0f} TFLOP/s, "
                  f"{cfg}", flush=True)


if __name__ == "__main__":
    main()
