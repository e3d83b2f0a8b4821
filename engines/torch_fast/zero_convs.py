"""The ControlNet's 13 zero convolutions (1x1) as ONE grouped GEMM launch.

Why: each step ends the ControlNet with 13 1x1 convolutions, one per control residual, at four map sizes
(32x48 ... 4x6 for 256x384) and 320-1280 channels. Each is a tiny GEMM: cuDNN / Inductor run them as 13 launches
of about 5 us each (bench/NOTES.md, session 9), mostly launch and tail, while together they move only about 30 MB
(13 weight matrices, 23 MB in fp16, plus their inputs and outputs): a few microseconds at HBM speed. Here one
Triton program grid covers every problem's output tiles: program p finds its problem by static ranges of program
ids (the problems' shapes are compile-time constants), and the problems with the longest K loops come first so
they start first.

Numerics: per output tile, fp32 accumulation over K in steps of BLOCK_K, plus the bias, rounded once to the input
dtype; what cuDNN computes up to the order of the K sum.

The outputs lie in one flat buffer; `ZeroConvs` hands out (N, C, h, w) channels_last views of it, so nothing is
copied. The launch runs as the operator cnrt::zero_convs, which torch.compile keeps whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from profiles.config import env_flag

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None

ENABLED = env_flag("CNRT_GROUPED_ZERO_CONVS", True)  # 0: one convolution each (A/B measurements)
BLOCK_K = 64


@dataclass(frozen=True)
class TileConfig:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def from_env(cls) -> "TileConfig":
        """CNRT_ZERO_CONV_TILE="block_m,block_n,num_warps,num_stages" (A/B measurements), else the default."""
        value = os.environ.get("CNRT_ZERO_CONV_TILE", "").strip()
        if not value:
            return cls()
        try:
            return cls(*(int(v) for v in value.split(",")))
        except (TypeError, ValueError):
            raise ValueError(f"CNRT_ZERO_CONV_TILE must be 'block_m,block_n,num_warps,num_stages', got {value!r}")


@dataclass(frozen=True)
class Plan:
    """The launch layout for a list of problems (rows M, in channels K, out channels N), in the caller's order.

    order: problem indices in launch order (longest K first); tile_starts: the first program of each problem in
    that order, plus the total; out_offsets: each problem's element offset in the flat output (caller's order)."""

    rows: tuple
    k: tuple
    n: tuple
    order: tuple
    tile_starts: tuple
    out_offsets: tuple

    @classmethod
    def of(cls, rows: tuple, k: tuple, n: tuple, cfg: TileConfig) -> "Plan":
        order = tuple(sorted(range(len(rows)), key=lambda i: (-k[i], i)))
        starts = [0]
        for i in order:
            starts.append(starts[-1] + -(-rows[i] // cfg.block_m) * (n[i] // cfg.block_n))
        offsets, total = [], 0
        for m_i, n_i in zip(rows, n):
            offsets.append(total)
            total += m_i * n_i
        return cls(tuple(rows), tuple(k), tuple(n), order, tuple(starts), tuple(offsets))

    @property
    def total_out(self) -> int:
        return self.out_offsets[-1] + self.rows[-1] * self.n[-1]


def fits(channels_in: int, channels_out: int, cfg: TileConfig) -> bool:
    return channels_in % BLOCK_K == 0 and channels_out % cfg.block_n == 0


if triton is not None:

    @triton.jit
    def _zero_convs_kernel(a_ptrs, w_ptrs, b_ptrs, out_ptr, ROWS: tl.constexpr, K: tl.constexpr,
                           N: tl.constexpr, OFFSETS: tl.constexpr, STARTS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program pid computes one (BLOCK_M, BLOCK_N) tile of problem p, the p with STARTS[p] <= pid <
        STARTS[p + 1]: out[p] = a[p] (ROWS[p], K[p]) @ w[p] (K[p], N[p]) + b[p]. Tuples are in launch order."""
        pid = tl.program_id(0)
        for p in tl.static_range(len(ROWS)):
            if (pid >= STARTS[p]) & (pid < STARTS[p + 1]):
                tiles_n: tl.constexpr = N[p] // BLOCK_N
                t = pid - STARTS[p]
                offs_m = (t // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
                offs_n = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
                offs_k = tl.arange(0, BLOCK_K)
                row_ok = (offs_m < ROWS[p])[:, None]
                a_tile = a_ptrs[p] + offs_m[:, None] * K[p] + offs_k[None, :]
                w_tile = w_ptrs[p] + offs_k[:, None] * N[p] + offs_n[None, :]
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for _ in range(K[p] // BLOCK_K):
                    a = tl.load(a_tile, mask=row_ok, other=0.0)
                    acc = tl.dot(a, tl.load(w_tile), acc)
                    a_tile += BLOCK_K
                    w_tile += BLOCK_K * N[p]
                acc += tl.load(b_ptrs[p] + offs_n).to(tl.float32)[None, :]
                dst = out_ptr + OFFSETS[p] + offs_m[:, None] * N[p] + offs_n[None, :]
                tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


def grouped_matmul(rows: list[torch.Tensor], weights: list[torch.Tensor], biases: list[torch.Tensor],
                   cfg: "TileConfig | None" = None) -> torch.Tensor:
    """rows[i] (M_i, K_i) row-major, weights[i] (K_i, N_i) row-major, biases[i] (N_i,) -> one flat buffer holding
    every rows[i] @ weights[i] + biases[i], (M_i, N_i) row-major, one after the other, in rows' dtype.
    One kernel launch (the Triton interpreter runs it on the CPU)."""
    cfg = cfg or TileConfig()
    if not (len(rows) == len(weights) == len(biases)) or not rows:
        raise ValueError("grouped_matmul needs one weight and one bias per input, and at least one input")
    for x, w, b in zip(rows, weights, biases):
        if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[0] or b.shape != (w.shape[1],):
            raise ValueError(f"shapes do not chain: rows {tuple(x.shape)}, weight {tuple(w.shape)}, "
                             f"bias {tuple(b.shape)}")
        if not fits(w.shape[0], w.shape[1], cfg):
            raise ValueError(f"K={w.shape[0]} must be a multiple of {BLOCK_K} and N={w.shape[1]} of {cfg.block_n}")
    rows = [x.contiguous() for x in rows]
    weights = [w.contiguous() for w in weights]
    biases = [b.contiguous() for b in biases]
    plan = Plan.of(tuple(x.shape[0] for x in rows), tuple(w.shape[0] for w in weights),
                   tuple(w.shape[1] for w in weights), cfg)
    out = torch.empty(plan.total_out, device=rows[0].device, dtype=rows[0].dtype)
    o = plan.order
    _zero_convs_kernel[(plan.tile_starts[-1],)](
        tuple(rows[i] for i in o), tuple(weights[i] for i in o), tuple(biases[i] for i in o), out,
        tuple(plan.rows[i] for i in o), tuple(plan.k[i] for i in o), tuple(plan.n[i] for i in o),
        tuple(plan.out_offsets[i] for i in o), plan.tile_starts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=BLOCK_K, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N*h*w, C) rows, a view when x is channels_last."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _output_views(flat: torch.Tensor, shapes: list[tuple[int, int, int, int]]) -> list[torch.Tensor]:
    """The flat buffer as (N, C, h, w) channels_last views, one per output shape, in order."""
    views, start = [], 0
    for n, c, h, w in shapes:
        size = n * c * h * w
        views.append(flat[start:start + size].view(n, h, w, c).permute(0, 3, 1, 2))
        start += size
    return views


if triton is not None:

    @torch.library.custom_op("cnrt::zero_convs", mutates_args=(), device_types="cuda")
    def _zero_convs_op(xs: list[torch.Tensor], weights: list[torch.Tensor], biases: list[torch.Tensor],
                       tile: list[int]) -> torch.Tensor:
        return grouped_matmul([_rows(x.contiguous(memory_format=torch.channels_last)) for x in xs], weights,
                              biases, TileConfig(*tile))

    @_zero_convs_op.register_fake
    def _(xs, weights, biases, tile):
        return xs[0].new_empty(sum(x.shape[0] * x.shape[2] * x.shape[3] * w.shape[1] for x, w in zip(xs, weights)))


def can_group(convs: list[nn.Conv2d], cfg: "TileConfig | None" = None) -> bool:
    """Plain 1x1 convolutions with biases whose channel counts the kernel tiles."""
    cfg = cfg or TileConfig()
    return bool(convs) and all(
        c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0) and c.groups == 1
        and c.dilation == (1, 1) and c.bias is not None and fits(c.in_channels, c.out_channels, cfg)
        for c in convs)


class ZeroConvs(nn.Module):
    """A list of 1x1 convolutions run as one grouped GEMM: forward(xs) == [conv(x) for conv, x in zip(convs, xs)],
    the outputs being channels_last views of one buffer. Off CUDA (or with CNRT_GROUPED_ZERO_CONVS=0) each runs
    as F.conv2d with the same weights."""

    def __init__(self, convs: list[nn.Conv2d], cfg: "TileConfig | None" = None):
        super().__init__()
        self.cfg = cfg or TileConfig.from_env()
        if not can_group(convs, self.cfg):
            raise ValueError("ZeroConvs needs 1x1 convolutions with biases and channel counts the tile divides")
        self.count = len(convs)
        for i, c in enumerate(convs):  # (Cin, Cout) matrices; not in the state dict: they are the convs' weights
            self.register_buffer(f"weight{i}", c.weight.detach()[:, :, 0, 0].t().contiguous(), persistent=False)
            self.register_buffer(f"bias{i}", c.bias.detach().clone(), persistent=False)

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"weight{i}") for i in range(self.count)]

    def biases(self) -> list[torch.Tensor]:
        return [getattr(self, f"bias{i}") for i in range(self.count)]

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(xs) != self.count:
            raise ValueError(f"expected {self.count} inputs, got {len(xs)}")
        if not (ENABLED and triton is not None and xs[0].is_cuda):
            return [F.conv2d(x, w.t()[:, :, None, None], b) for x, w, b in zip(xs, self.weights(), self.biases())]
        c = self.cfg
        flat = torch.ops.cnrt.zero_convs(list(xs), self.weights(), self.biases(),
                                         [c.block_m, c.block_n, c.num_warps, c.num_stages])
        shapes = [(x.shape[0], w.shape[1], x.shape[2], x.shape[3]) for x, w in zip(xs, self.weights())]
        return _output_views(flat, shapes)
