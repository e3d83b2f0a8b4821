"""Implicit-GEMM convolution of NHWC fp16 maps in Triton, with split-K: the step's 3x3 convolutions.

Why: at 256x384 the step's 3x3 convolutions are GEMMs of M = 48..3072 rows (pixels x CFG batch 2), K = 9*Cin up to
23040 and N = Cout up to 1280. cuDNN runs them at 64x64 tiles without splitting K, so the deep levels fill a fraction
of the SMs; im2col + cuBLAS was faster per layer but its gather costs a kernel and a round trip per convolution
(bench/NOTES.md). This kernel gathers the im2col tile straight from the NHWC map (one 3x3 tap and BLOCK_K
channels per K step, zero outside the map), so it needs no extra memory pass, and it splits K across programs for
the skinny shapes. Per-shape block sizes and split come from `conv_tuning.py`, measured once on the GPU at build
time.

A second kernel (`_conv_tma_kernel`, stride 1) takes its tiles by TMA: the output tile is a box of (images, rows,
columns), so each tap's A tile is the same box of the input shifted by the tap, one bulk tensor copy that the copy
engine zero-fills past the border; the weight tile is a bulk copy too. On an H200 it is the choice for 20 of the
28 stride-1 shapes, 2-17% faster than the gather kernel there (python3 -m bench.conv_tma); the tuner picks per
shape between the two kernels and cuDNN.

With a K split, the partial sums are added by one reduction that Inductor fuses into the consumer; with
CNRT_SPLIT_FIXUP=1 (opt-in, off: correct on an H200 but the loop was 5.5 ms slower, bench/NOTES.md session 8) the
last program of each output tile adds them inside the kernel, in a fixed order, and stores the final fp16 tile
(`_epilogue`).

Requirements: x channels_last (NHWC memory), Cin a multiple of BLOCK_K, weight as `weight_matrix` lays it out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from engines.torch_fast import pdl
from profiles.config import env_flag

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch backend then keeps cuDNN
    triton = tl = None


@dataclass(frozen=True)
class ConvConfig:
    """One launch configuration. `box` (images, rows, columns) selects the TMA kernel: each program's output tile
    is that rectangle of output pixels (block_m = their product), and every A tile is one bulk tensor copy of the
    same rectangle shifted by the tap, zero-filled outside the map by the copy engine. None: the gather kernel."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    box: "tuple[int, int, int] | None" = None

    def __post_init__(self):
        if self.box is not None:
            object.__setattr__(self, "box", tuple(self.box))  # from JSON it arrives as a list
            if self.box[0] * self.box[1] * self.box[2] != self.block_m:
                raise ValueError(f"box {self.box} does not hold block_m={self.block_m} pixels")

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.box is None:
            del d["box"]  # tables written before the TMA kernel read the same
        else:
            d["box"] = list(self.box)
        return d


def available() -> bool:
    return triton is not None


if triton is not None:
    # their own names: Inductor re-emits a traced kernel's callees by name
    from engines.torch_fast.pdl import pdl_begin, pdl_end

    @triton.jit
    def _epilogue(acc, out_ptr, ws_ptr, count_ptr, bias_ptr, res_ptr, offs_m, offs_n, row_ok, col_ok, group, pid_k,
                  tile, M, COUT, GROUPS, SPLIT, BIAS_STRIDE, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                  FIXUP: tl.constexpr):
        """Both kernels' end: bias, residual and the store of one output tile (offs_m: output rows within the
        group). A split program without FIXUP stores its fp32 partial sum at slot pid_k (a reduction outside adds
        them up). With FIXUP each program of a split stores its partial in ws, and the last of them to finish the
        tile (an arrival counter per tile) adds the SPLIT partials in slot order, so the sum does not depend on
        which finished last, resets the counter and goes on to bias, residual and the final store."""
        tile_ok = row_ok[:, None] & col_ok[None, :]
        rows = group * M + offs_m[:, None]
        if FIXUP:
            tl.store(ws_ptr + (pid_k * GROUPS * M + rows) * COUT + offs_n[None, :], acc, mask=tile_ok)
            tl.debug_barrier()  # every thread's partial is stored before the arrival
            last = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT - 1
            tile_ok = tile_ok & last
            acc = tl.zeros_like(acc)
            for s in range(SPLIT):
                acc += tl.load(ws_ptr + (s * GROUPS * M + rows) * COUT + offs_n[None, :], mask=tile_ok, other=0.0,
                               cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + tile, 0, mask=last, sem="relaxed")  # ready for the next launch
            out = out_ptr + rows * COUT + offs_n[None, :]
        else:
            out = out_ptr + (pid_k * GROUPS * M + rows) * COUT + offs_n[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + group * BIAS_STRIDE + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:  # + a tensor of the output's shape (the resnet's identity shortcut)
            acc += tl.load(res_ptr + rows * COUT + offs_n[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _conv_nhwc_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, x2_ptr, res_ptr, ws_ptr, count_ptr,
                          H, W, C, OW, OHW, COUT, M, K_STEPS_PER_SPLIT, SPLIT, GROUPS, C2, BIAS_STRIDE,
                          STRIDE: tl.constexpr, PAD: tl.constexpr, KSIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_SHORTCUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FIXUP: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr = False):
        pdl_begin(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_z = tl.program_id(2)
        group = pid_z // SPLIT  # groups: independent convolutions (own images, weights, bias) in one launch
        pid_k = pid_z - group * SPLIT
        x_group = x_ptr + group * (M // OHW) * H * W * C
        w_group = w_ptr + group * (KSIZE * KSIZE * C + C2) * COUT
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        img = offs_m // OHW
        rem = offs_m - img * OHW
        oy = rem // OW
        ox = rem - oy * OW
        row_ok = offs_m < M
        col_ok = offs_n < COUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_main = KSIZE * KSIZE * C // BLOCK_K  # K steps of the convolution proper; the shortcut's follow
        k_begin = pid_k * K_STEPS_PER_SPLIT
        k_end = k_begin + K_STEPS_PER_SPLIT
        for kk in range(k_begin, tl.minimum(k_end, k_main)):
            k0 = kk * BLOCK_K
            tap = k0 // C  # one (ky, kx) tap per K step: C is a multiple of BLOCK_K
            c0 = k0 - tap * C
            ky = tap // KSIZE
            kx = tap - ky * KSIZE
            iy = oy * STRIDE + ky - PAD
            ix = ox * STRIDE + kx - PAD
            ok = row_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            pixel = (img * H + iy) * W + ix
            a = tl.load(x_group + pixel[:, None] * C + (c0 + offs_k)[None, :], mask=ok[:, None], other=0.0)
            b = tl.load(w_group + (k0 + offs_k)[:, None] * COUT + offs_n[None, :], mask=col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
        if HAS_SHORTCUT:  # a 1x1 convolution of x2 (same pixels as the output, C2 channels): extra K rows
            x2_group = x2_ptr + group * M * C2
            for kk in range(tl.maximum(k_begin, k_main), k_end):
                c0 = (kk - k_main) * BLOCK_K
                a = tl.load(x2_group + offs_m[:, None] * C2 + (c0 + offs_k)[None, :], mask=row_ok[:, None],
                            other=0.0)
                b = tl.load(w_group + (kk * BLOCK_K + offs_k)[:, None] * COUT + offs_n[None, :],
                            mask=col_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc)
        pdl_end(PDL)
        tile = (group * tl.num_programs(0) + pid_m) * tl.num_programs(1) + pid_n
        _epilogue(acc, out_ptr, ws_ptr, count_ptr, bias_ptr, res_ptr, offs_m, offs_n, row_ok, col_ok, group, pid_k,
                  tile, M, COUT, GROUPS, SPLIT, BIAS_STRIDE, HAS_BIAS, HAS_RESIDUAL, FIXUP)


    @triton.jit
    def _conv_tma_kernel(x_desc, w_desc, x2_desc, bias_ptr, out_ptr, res_ptr, ws_ptr, count_ptr,
                         N_IMG, OH, OW, C, COUT, KROWS, K_STEPS_PER_SPLIT, SPLIT, GROUPS, M, BIAS_STRIDE,
                         TILES_Y, TILES_X,
                         PAD: tl.constexpr, KSIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_SHORTCUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FIXUP: tl.constexpr,
                         BOX_I: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
        """Stride-1 convolution, A and B tiles by TMA: the output tile is a BOX_I x BOX_H x BOX_W block of
        (image, row, column), so the tap (ky, kx)'s A tile is the same block of the input shifted by
        (ky - PAD, kx - PAD); the copy engine fills what falls outside the map (the padding) with zeros."""
        BLOCK_M: tl.constexpr = BOX_I * BOX_H * BOX_W
        pdl_begin(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_z = tl.program_id(2)
        group = pid_z // SPLIT
        pid_k = pid_z - group * SPLIT
        tile_x = pid_m % TILES_X
        tile_y = (pid_m // TILES_X) % TILES_Y
        tile_i = pid_m // (TILES_X * TILES_Y)
        img0 = tile_i * BOX_I  # first image of the tile, within the group
        y0 = tile_y * BOX_H
        x0 = tile_x * BOX_W
        n_first = group * N_IMG + img0  # images beyond the group's are loaded but never stored
        n0 = pid_n * BLOCK_N
        w_row0 = group * KROWS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_main = KSIZE * KSIZE * C // BLOCK_K
        k_begin = pid_k * K_STEPS_PER_SPLIT
        k_end = k_begin + K_STEPS_PER_SPLIT
        for kk in range(k_begin, tl.minimum(k_end, k_main)):
            k0 = kk * BLOCK_K
            tap = k0 // C
            c0 = k0 - tap * C
            ky = tap // KSIZE
            kx = tap - ky * KSIZE
            a = x_desc.load([n_first, y0 + ky - PAD, x0 + kx - PAD, c0]).reshape(BLOCK_M, BLOCK_K)
            b = w_desc.load([w_row0 + k0, n0])
            acc = tl.dot(a, b, acc)
        if HAS_SHORTCUT:
            for kk in range(tl.maximum(k_begin, k_main), k_end):
                a = x2_desc.load([n_first, y0, x0, (kk - k_main) * BLOCK_K]).reshape(BLOCK_M, BLOCK_K)
                b = w_desc.load([w_row0 + kk * BLOCK_K, n0])
                acc = tl.dot(a, b, acc)
        pdl_end(PDL)
        r = tl.arange(0, BLOCK_M)
        img = img0 + r // (BOX_H * BOX_W)
        oy = y0 + (r // BOX_W) % BOX_H
        ox = x0 + r % BOX_W
        offs_m = (img * OH + oy) * OW + ox  # output row within the group
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_ok = (img < N_IMG) & (oy < OH) & (ox < OW)
        col_ok = offs_n < COUT
        tile = (group * tl.num_programs(0) + pid_m) * tl.num_programs(1) + pid_n
        _epilogue(acc, out_ptr, ws_ptr, count_ptr, bias_ptr, res_ptr, offs_m, offs_n, row_ok, col_ok, group, pid_k,
                  tile, M, COUT, GROUPS, SPLIT, BIAS_STRIDE, HAS_BIAS, HAS_RESIDUAL, FIXUP)


def weight_matrix(weight: torch.Tensor, shortcut: "torch.Tensor | None" = None) -> torch.Tensor:
    """Conv weights (..., Cout, Cin, kh, kw) -> (..., kh*kw*Cin, Cout), rows in (kernel row, kernel column, input
    channel) order: the layout this kernel (and `gemm_conv.gemm_conv2d`) reads. With a 1x1 shortcut convolution's
    weights (..., Cout, C2, 1, 1), its C2 rows follow."""
    *lead, cout, cin, kh, kw = weight.shape
    n = len(lead)
    order = (*range(n), n + 2, n + 3, n + 1, n)
    rows = weight.permute(order).reshape(*lead, kh * kw * cin, cout)
    if shortcut is not None:
        rows = torch.cat([rows, shortcut.reshape(*lead, cout, -1).transpose(-1, -2)], dim=-2)
    return rows.contiguous()


def output_size(h: int, w: int, kernel_size: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kernel_size) // stride + 1, (w + 2 * padding - kernel_size) // stride + 1


def supports(in_channels: int, kernel_size: int, cfg: ConvConfig, shortcut_channels: int = 0,
             stride: int = 1) -> bool:
    k_steps = (kernel_size * kernel_size * in_channels + shortcut_channels) // cfg.block_k
    return (in_channels % cfg.block_k == 0 and shortcut_channels % cfg.block_k == 0 and k_steps % cfg.split_k == 0
            and (cfg.box is None or stride == 1))


def _launch_tma(grid, x, weight, bias, out, shortcut, residual, ws, counts, n_img, oh, ow, c, cout,
                k_steps_per_split, groups, m, bias_stride, kernel_size, padding, cfg: ConvConfig) -> None:
    """The TMA kernel's descriptors and launch (grid: one program per box, N tile and split, as `_launch` counts
    them). Its 4-D descriptors see the channels_last maps as the (N, H, W, C) tensors they are in memory; the
    weight's as (groups * rows, Cout)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bi, bh, bw = cfg.box
    a_block = [bi, bh, bw, cfg.block_k]
    x_desc = TensorDescriptor.from_tensor(x.permute(0, 2, 3, 1), a_block)
    w_desc = TensorDescriptor.from_tensor(weight.reshape(-1, cout), [cfg.block_k, cfg.block_n])
    x2_desc = x_desc if shortcut is None else TensorDescriptor.from_tensor(shortcut.permute(0, 2, 3, 1), a_block)
    tiles_y, tiles_x = triton.cdiv(oh, bh), triton.cdiv(ow, bw)
    _conv_tma_kernel[grid](
        x_desc, w_desc, x2_desc, weight if bias is None else bias, out, weight if residual is None else residual,
        weight if ws is None else ws, weight if counts is None else counts,
        n_img, oh, ow, c, cout, weight.shape[-2], k_steps_per_split, cfg.split_k, groups, m, bias_stride,
        tiles_y, tiles_x, PAD=padding, KSIZE=kernel_size, HAS_BIAS=bias is not None,
        HAS_SHORTCUT=shortcut is not None, HAS_RESIDUAL=residual is not None, FIXUP=ws is not None, BOX_I=bi,
        BOX_H=bh, BOX_W=bw, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl.launch_args(x.device))


# Split-K reduced inside the kernel (`_epilogue`'s FIXUP): opt-in, off (slower in the loop, bench/NOTES.md).
SPLIT_FIXUP = env_flag("CNRT_SPLIT_FIXUP", False)
_COUNTS_PER_REGION = 4096  # arrival counters one convolution may use (its output tiles; the step's need <= 480)
_REGIONS = 256
_counters: dict = {}
_regions: dict = {}


def _tile_counters(device: torch.device, weight: torch.Tensor, tiles: int) -> torch.Tensor:
    """Zeroed arrival counters for one convolution's tiles: a region of a per-device buffer, one region per weight
    tensor (so two convolutions on two streams never share counters, for the first _REGIONS weights seen; the step
    has fewer than 60 split convolutions). The kernel leaves them at zero. The buffer is
    made on a device's first call, which the runner makes in warm-up, before any CUDA-graph capture."""
    if tiles > _COUNTS_PER_REGION:
        raise ValueError(f"{tiles} output tiles exceed the {_COUNTS_PER_REGION} counters a convolution may use")
    key = (device.type, device.index)
    if key not in _counters:
        _counters[key] = torch.zeros(_REGIONS, _COUNTS_PER_REGION, dtype=torch.int32, device=device)
    region = _regions.setdefault((key, weight.data_ptr()), len(_regions) % _REGIONS)
    return _counters[key][region]


# The split-K partials are added as an unrolled chain of slices (A/B measurements; 0: one `sum(0)`).
SPLIT_SUM_UNROLLED = env_flag("CNRT_SPLIT_SUM_UNROLLED", True)


def sum_partials(parts: torch.Tensor, unrolled: "bool | None" = None) -> torch.Tensor:
    """(S, rows, Cout) fp32 split-K partials -> their sum, (rows, Cout).

    unrolled (default: CNRT_SPLIT_SUM_UNROLLED while torch.compile traces) adds the S slices one after another,
    in split order. Why: compiled, parts.sum(0) over S <= 16 became Inductor's persistent reduction, whose threads
    walk the split dimension (M * Cout elements apart): a standalone one took 6-8 us at 16x24 for 12 MB. As a chain
    of slices it is a pointwise expression that loads S coalesced rows and fuses into its consumer like any add:
    loop 69.79 -> 68.79 ms on one H200 (bench/NOTES.md, session 9). Run eagerly (the conv tuner's timing, CPU
    tests) one sum(0) is the cheaper form: S - 1 separate add kernels would overcharge every split."""
    if unrolled is None:
        unrolled = SPLIT_SUM_UNROLLED and torch.compiler.is_compiling()
    if not unrolled:
        return parts.sum(0)
    total = parts[0]
    for i in range(1, parts.shape[0]):
        total = total + parts[i]
    return total


def conv2d_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None", kernel_size: int, stride: int,
                padding: int, cfg: ConvConfig, groups: int = 1, shortcut: "torch.Tensor | None" = None,
                residual: "torch.Tensor | None" = None, sum_only: bool = False,
                fixup: "bool | None" = None) -> torch.Tensor:
    """conv2d of x (N, C, H, W), channels_last memory -> (N, Cout, OH, OW), channels_last memory.

    groups > 1 runs that many independent convolutions in one launch: images [g*N/groups, (g+1)*N/groups) use
    weight[g] (groups, kh*kw*Cin, Cout) and bias[g] (groups, Cout; rows may be strided). With split_k > 1 the
    programs write fp32 partial sums (split_k, M, Cout) that one reduction adds up (with the bias); under
    torch.compile that reduction fuses into whatever consumes the output. With fixup (default: CNRT_SPLIT_FIXUP on
    CUDA) the kernel adds them up itself instead: the last program of each tile, in a fixed order (see `_epilogue`).

    The two fusions a ResNet block's second convolution needs, so it is one kernel:
    - shortcut (N, C2, OH, OW), channels_last: adds the 1x1 convolution of it, whose (C2, Cout) weight rows follow
      the kxk rows in `weight` (see `weight_matrix(..., shortcut=)`), as extra K steps of the same GEMM;
    - residual (N, Cout, OH, OW), channels_last: added to the output.

    sum_only (tuning): with split_k > 1, return the fp32 sum of the partials, (groups * M, Cout), and skip the bias,
    residual and cast; that is what a split costs inside a compiled part, where those fuse into the consumer.

    The launch runs as the operator cnrt::conv2d_launch (which torch.compile keeps whole) when the kernel needs
    what a traced launch cannot give: the split fixup's private arrival counters, or PDL's launch attribute
    (`pdl.py`). Otherwise it is called directly, and under torch.compile Dynamo records the kernel in the graph.
    """
    fixup = (SPLIT_FIXUP and x.is_cuda if fixup is None else fixup) and cfg.split_k > 1 and not sum_only
    n, c, h, w = x.shape
    cout = weight.shape[-1]
    c2 = 0 if shortcut is None else shortcut.shape[1]
    if not supports(c, kernel_size, cfg, c2, stride):
        raise ValueError(f"config {cfg} does not fit Cin={c} (+ shortcut {c2}), kernel {kernel_size}, stride {stride}")
    if weight.shape[-2] != kernel_size * kernel_size * c + c2:
        raise ValueError(f"weight has {weight.shape[-2]} rows, the convolution needs {kernel_size}^2*{c} + {c2}")
    if n % groups or (groups > 1 and (weight.dim() != 3 or weight.shape[0] != groups)):
        raise ValueError(f"{groups} groups need N divisible by them and weight (groups, K, Cout), got N={n}, "
                         f"weight {tuple(weight.shape)}")
    oh, ow = output_size(h, w, kernel_size, stride, padding)
    for name, t, channels in (("shortcut", shortcut, c2), ("residual", residual, cout)):
        if t is not None and tuple(t.shape) != (n, channels, oh, ow):
            raise ValueError(f"{name} must be {(n, channels, oh, ow)}, got {tuple(t.shape)}")
    m = n // groups * oh * ow  # output rows per group
    x = x.contiguous(memory_format=torch.channels_last)
    if shortcut is not None:
        shortcut = shortcut.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    final = cfg.split_k == 1 or fixup  # the kernel writes the finished output: bias, residual and cast included
    kernel_bias = bias if final else None
    kernel_residual = residual if final else None
    if x.is_cuda and (fixup or pdl.enabled(x.device)):
        out = torch.ops.cnrt.conv2d_launch(
            x, weight, kernel_bias, shortcut, kernel_residual, kernel_size, stride, padding,
            [cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, cfg.num_stages],
            list(cfg.box) if cfg.box is not None else [], groups, fixup)
    else:
        out = _launch(x, weight, kernel_bias, shortcut, kernel_residual, kernel_size, stride, padding, cfg, groups,
                      fixup)
    if final:
        result = out[0]
    elif sum_only:
        return sum_partials(out)
    else:
        total = sum_partials(out)
        if bias is not None:
            total = (total.reshape(groups, m, cout) + bias.float().reshape(groups, 1, cout)).reshape(groups * m, cout)
        if residual is not None:
            total = total + residual.permute(0, 2, 3, 1).reshape(groups * m, cout).float()
        result = total.to(x.dtype)
    return result.reshape(n, oh, ow, cout).permute(0, 3, 1, 2)


def _launch(x, weight, bias, shortcut, residual, kernel_size, stride, padding, cfg: ConvConfig, groups,
            fixup: bool) -> torch.Tensor:
    """One launch of a kernel for checked, channels_last inputs -> its output rows: (1, groups * M, Cout) in x's
    dtype when the kernel finishes them (no split, or fixup; bias and residual are then added in it), else the
    (split_k, groups * M, Cout) fp32 partial sums (bias and residual must then be None: added after the sum)."""
    n, c, h, w = x.shape
    cout = weight.shape[-1]
    c2 = 0 if shortcut is None else shortcut.shape[1]
    oh, ow = output_size(h, w, kernel_size, stride, padding)
    m = n // groups * oh * ow
    k_steps = (kernel_size * kernel_size * c + c2) // cfg.block_k
    split = cfg.split_k
    final = split == 1 or fixup
    bias_stride = 0 if bias is None or bias.dim() != 2 else bias.stride(0)
    out = torch.empty((1 if final else split, groups * m, cout), device=x.device,
                      dtype=x.dtype if final else torch.float32)
    ws = counts = None
    if cfg.box is not None:
        grid = (box_tiles(n // groups, oh, ow, cfg.box), triton.cdiv(cout, cfg.block_n), split * groups)
    else:
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(cout, cfg.block_n), split * groups)
    if fixup:
        ws = torch.empty((split, groups * m, cout), device=x.device, dtype=torch.float32)
        counts = _tile_counters(x.device, weight, grid[0] * grid[1] * groups)
    if cfg.box is not None:
        _launch_tma(grid, x, weight, bias, out, shortcut, residual, ws, counts, n // groups, oh, ow, c, cout,
                    k_steps // split, groups, m, bias_stride, kernel_size, padding, cfg)
    else:
        # Called directly under torch.compile too (only with PDL off: see conv2d_nhwc). Arguments the kernel
        # never reads get the weight, not `out`, so no argument aliases the one it writes.
        _conv_nhwc_kernel[grid](
            x, weight, weight if bias is None else bias, out, weight if shortcut is None else shortcut,
            weight if residual is None else residual, weight if ws is None else ws,
            weight if counts is None else counts,
            h, w, c, ow, oh * ow, cout, m, k_steps // split, split, groups, c2, bias_stride,
            STRIDE=stride, PAD=padding, KSIZE=kernel_size, HAS_BIAS=bias is not None,
            HAS_SHORTCUT=shortcut is not None, HAS_RESIDUAL=residual is not None, FIXUP=fixup,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **pdl.launch_args(x.device))
    return out


if triton is not None:

    @torch.library.custom_op("cnrt::conv2d_launch", mutates_args=(), device_types="cuda")
    def _launch_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   shortcut: Optional[torch.Tensor], residual: Optional[torch.Tensor], kernel_size: int,
                   stride: int, padding: int, config: list[int], box: list[int], groups: int,
                   fixup: bool) -> torch.Tensor:
        """`_launch` as one operator that torch.compile does not trace into: the fixup's arrival counters live in
        a buffer it does not see, and a traced launch would drop PDL's launch attribute."""
        cfg = ConvConfig(*config, box=tuple(box) if box else None)
        return _launch(x, weight, bias, shortcut, residual, kernel_size, stride, padding, cfg, groups, fixup)

    @_launch_op.register_fake
    def _(x, weight, bias, shortcut, residual, kernel_size, stride, padding, config, box, groups, fixup):
        n, _, h, w = x.shape
        oh, ow = output_size(h, w, kernel_size, stride, padding)
        final = config[3] == 1 or fixup
        return x.new_empty((1 if final else config[3], n * oh * ow, weight.shape[-1]),
                           dtype=x.dtype if final else torch.float32)


# (block_m, block_n, num_warps, num_stages) tried per shape; block_k is 64 (every wide Cin is a multiple of it).
# (64, 128, 4, 5) won the weight-bound 4x6 shapes in `python3 -m bench.conv_bandwidth`; 128x128 / 128x256 tiles
# have the arithmetic intensity the compute-bound 32x48 and 16x24 shapes need, with split-K to fill the SMs.
_TILES = ((64, 64, 4, 4), (64, 64, 4, 3), (64, 128, 4, 4), (64, 128, 4, 3), (64, 128, 4, 5), (128, 64, 4, 4),
          (128, 128, 8, 3), (128, 128, 4, 3), (128, 128, 8, 4), (64, 256, 8, 3), (128, 256, 8, 3))
_SPLITS = (1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 16)


def candidate_configs(m: int, cout: int, in_channels: int, kernel_size: int, shortcut_channels: int = 0
                      ) -> list[ConvConfig]:
    """The search space of one shape: the tiles above (128-row tiles only when M > 64; no tile wider than Cout)
    x no split, and the K splits that divide the K steps, keep >= 8 steps per split and leave <= ~4 waves of
    programs."""
    out = []
    bk = 64
    if in_channels % bk or shortcut_channels % bk:
        return out
    k_steps = (kernel_size * kernel_size * in_channels + shortcut_channels) // bk
    for bm, bn, warps, stages in _TILES:
        if (bm > 64 and m <= 64) or bn > max(cout, 64):
            continue
        tiles = -(-m // bm) * -(-cout // bn)
        for split in _SPLITS:
            if split == 1 or (k_steps % split == 0 and k_steps // split >= 8 and tiles * split <= 4 * 132):
                out.append(ConvConfig(bm, bn, bk, split, warps, stages))
    return out


# (block_m, block_n, num_warps, num_stages) of the TMA kernel; its A tile is a box of block_m output pixels.
_TMA_TILES = ((64, 128, 4, 4), (64, 128, 4, 5), (64, 256, 8, 3), (128, 64, 4, 4), (128, 128, 4, 3),
              (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3))


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def box_tiles(images: int, h: int, w: int, box: "tuple[int, int, int]") -> int:
    """How many (images, rows, columns) boxes tile `images` maps of h x w: the TMA kernel's programs per N tile."""
    return -(-images // box[0]) * -(-h // box[1]) * -(-w // box[2])


def output_box(images: int, h: int, w: int, block_m: int) -> "tuple[int, int, int] | None":
    """The (images, rows, columns) box of block_m pixels (powers of two, as Triton's blocks must be) that tiles
    `images` maps of h x w with the fewest wasted pixels; ties go to the widest box. None if no box fits."""
    best = None
    bw = 1
    while bw <= min(block_m, _pow2_at_least(w)):
        bh = 1
        while bw * bh <= block_m and bh <= _pow2_at_least(h):
            bi = block_m // (bw * bh)
            if bi <= _pow2_at_least(images):
                key = (box_tiles(images, h, w, (bi, bh, bw)) * block_m, -bw)
                if best is None or key < best[0]:
                    best = (key, (bi, bh, bw))
            bh *= 2
        bw *= 2
    return None if best is None else best[1]


def tma_candidate_configs(images: int, h: int, w: int, cout: int, in_channels: int, kernel_size: int,
                          shortcut_channels: int = 0, groups: int = 1) -> list[ConvConfig]:
    """The TMA kernel's search space for a stride-1 convolution of `images` maps a group: the tiles above with
    their best box (at most a third of the box's pixels wasted), x no split and the three smallest K splits that
    fill the SMs (>= 8 steps per split, <= ~4 waves of programs). TMA needs 16-byte rows: Cout a multiple of 64
    here."""
    out = []
    bk = 64
    if in_channels % bk or shortcut_channels % bk or cout % 64:
        return out
    k_steps = (kernel_size * kernel_size * in_channels + shortcut_channels) // bk
    for bm, bn, warps, stages in _TMA_TILES:
        box = output_box(images, h, w, bm)
        if box is None or bn > cout:
            continue
        tiles = box_tiles(images, h, w, box)
        if tiles * bm > 1.34 * images * h * w and bm > 64:
            continue
        ctas = tiles * -(-cout // bn) * groups
        splits = [sp for sp in _SPLITS if sp > 1 and k_steps % sp == 0 and k_steps // sp >= 8
                  and ctas * sp <= 4 * 132]
        filling = [sp for sp in splits if ctas * sp >= 132]  # the smallest splits that fill the SMs
        for split in [1, *(filling[:3] if filling else splits[-1:])]:
            # With the shortcut's second K loop, 8 warps, and 128-row tiles under a K split, gave wrong sums on an
            # H200 (Triton 3.6; relative error 3e-3 to 1.5e-2 at 8x12, cause not found). 4-warp 64-row tiles
            # and unsplit 128-row tiles were exact there and elsewhere: only those are offered.
            if shortcut_channels and (warps > 4 or (bm > 64 and split > 1)):
                continue
            out.append(ConvConfig(bm, bn, bk, split, warps, stages, box=box))
    return out

