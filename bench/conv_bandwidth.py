"""`python3 -m bench.conv_bandwidth`: how close the deep (weight-bound) 3x3 convolutions get to HBM bandwidth.

At levels 2-3 (8x12 and 4x6 latents, M = 48..192 rows a group) each convolution streams 29-59 MB of weights
for little arithmetic, so its floor is bytes / bandwidth. This probe times the implicit-GEMM K loop alone (no
split-K reduction) over a wide config space, with the weights in the row-major (K, Cout) layout the step uses
and in a tile-blocked layout (Cout/BLOCK_N, K, BLOCK_N) where each program's weight tile is contiguous, with and
without an evict-first hint on the weight stream, and prints the achieved weight bandwidth against a plain
read of the same bytes.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from engines.torch_fast.conv_tuning import graph_time_us
from engines.torch_fast.triton_conv import output_size


@triton.jit
def _probe_kernel(x_ptr, w_ptr, out_ptr, H, W, C, OW, OHW, COUT, M, K_STEPS_PER_SPLIT, SPLIT, GROUPS, KTOT,
                  BLOCKED: tl.constexpr, EVICT_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    group = pid_z // SPLIT
    pid_k = pid_z - group * SPLIT
    x_group = x_ptr + group * (M // OHW) * H * W * C
    w_group = w_ptr + group * KTOT * COUT
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    img = offs_m // OHW
    rem = offs_m - img * OHW
    oy = rem // OW
    ox = rem - oy * OW
    row_ok = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * K_STEPS_PER_SPLIT
    for kk in range(k_begin, k_begin + K_STEPS_PER_SPLIT):
        k0 = kk * BLOCK_K
        tap = k0 // C
        c0 = k0 - tap * C
        ky = tap // 3
        kx = tap - ky * 3
        iy = oy + ky - 1
        ix = ox + kx - 1
        ok = row_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        pixel = (img * H + iy) * W + ix
        a = tl.load(x_group + pixel[:, None] * C + (c0 + offs_k)[None, :], mask=ok[:, None], other=0.0)
        if BLOCKED:
            wp = w_group + pid_n * KTOT * BLOCK_N + (k0 + offs_k)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        else:
            wp = w_group + (k0 + offs_k)[:, None] * COUT + offs_n[None, :]
        if EVICT_W:
            b = tl.load(wp, eviction_policy="evict_first")
        else:
            b = tl.load(wp)
        acc = tl.dot(a, b, acc)
    out = out_ptr + (pid_k * GROUPS * M + group * M + offs_m[:, None]) * COUT + offs_n[None, :]
    tl.store(out, acc, mask=row_ok[:, None])


def blocked(mat: torch.Tensor, block_n: int) -> torch.Tensor:
    """(G, K, Cout) -> (G, Cout/block_n, K, block_n), contiguous."""
    g, k, cout = mat.shape
    return mat.reshape(g, k, cout // block_n, block_n).permute(0, 2, 1, 3).contiguous()


TILES = [(64, 64, 4, 4), (64, 64, 4, 6), (64, 128, 4, 4), (64, 128, 4, 5), (64, 128, 8, 4), (64, 256, 8, 3),
         (128, 64, 4, 4), (128, 128, 8, 3)]
SHAPES = [  # (groups, batch, Cin, H, W, Cout): the twin's and the decoder's 4x6 and 8x12 convolutions
    (2, 2, 1280, 4, 6, 1280), (1, 2, 2560, 4, 6, 1280), (2, 2, 1280, 8, 12, 1280), (1, 2, 2560, 8, 12, 1280)]


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    nbytes = 59 * 2 ** 20
    bufs = [torch.empty(nbytes // 2, device=dev, dtype=torch.float16).normal_() for _ in range(3)]
    read_us = graph_time_us(lambda i: lambda: bufs[i].sum(dtype=torch.float32))
    copy_us = graph_time_us(lambda i: lambda: bufs[i].clone())
    print(f"read 59 MiB: {read_us:.1f} us = {nbytes / read_us / 1e6:.2f} TB/s; "
          f"copy: {copy_us:.1f} us = {2 * nbytes / copy_us / 1e6:.2f} TB/s (read + write)")
    for g, n, c, h, w, cout in SHAPES:
        oh, ow = output_size(h, w, 3, 1, 1)
        m = n * oh * ow
        ktot = 9 * c
        k_steps = ktot // 64
        xs = [torch.randn(g * n, h, w, c, device=dev, dtype=torch.float16) for _ in range(3)]
        mats = [torch.randn(g, ktot, cout, device=dev, dtype=torch.float16) * 0.02 for _ in range(3)]
        wbytes = g * ktot * cout * 2
        ref = torch.einsum("gmk,gkn->gmn", _im2col(xs[0], g, n, h, w, c).float(), mats[0].float())
        best = {}
        for (bm, bn, warps, stages), is_blocked, evict in itertools.product(TILES, (False, True), (False, True)):
            if (bm > 64 and m <= 64) or cout % bn:
                continue
            wl = [blocked(mt, bn) if is_blocked else mt for mt in mats]
            tiles = -(-m // bm) * (cout // bn)
            for split in range(1, k_steps + 1):
                if k_steps % split or k_steps // split < 4 or tiles * split * g > 8 * 132:
                    continue
                out = torch.empty(split, g * m, cout, device=dev, dtype=torch.float32)
                grid = (triton.cdiv(m, bm), cout // bn, split * g)

                def call(i, split=split, out=out, wl=wl, grid=grid, bm=bm, bn=bn, warps=warps, stages=stages,
                         is_blocked=is_blocked, evict=evict):
                    return lambda: _probe_kernel[grid](
                        xs[i], wl[i], out, h, w, c, ow, oh * ow, cout, m, k_steps // split, split, g, ktot,
                        BLOCKED=is_blocked, EVICT_W=evict, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, num_warps=warps,
                        num_stages=stages)

                call(0)()
                err = ((out.sum(0).reshape(g, m, cout) - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    raise RuntimeError(f"probe wrong: {err}")
                us = graph_time_us(call)
                key = ("blocked" if is_blocked else "rowmajor") + ("+evict" if evict else "")
                if key not in best or us < best[key][0]:
                    best[key] = (us, (bm, bn, warps, stages, split))
        print(f"{g}x[{n}x{c}x{h}x{w}->{cout}] weights {wbytes / 2 ** 20:.0f} MiB, M {m}:")
        for key, (us, cfg) in sorted(best.items(), key=lambda kv: kv[1][0]):
            print(f"   {key:16s} {us:6.1f} us  {wbytes / us / 1e6:5.2f} TB/s  "
                  f"{2 * g * m * cout * ktot / us / 1e6:6.1f} TFLOP/s  (bm, bn, warps, stages, split) = {cfg}")


def _im2col(x: torch.Tensor, g: int, n: int, h: int, w: int, c: int) -> torch.Tensor:
    xp = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1))
    cols = torch.cat([xp[:, :, ky:ky + h, kx:kx + w] for ky in range(3) for kx in range(3)], dim=1)
    return cols.permute(0, 2, 3, 1).reshape(g, n * h * w, 9 * c)


if __name__ == "__main__":
    main()
