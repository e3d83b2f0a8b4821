"""A LayerNorm and the linear layer that reads it as ONE Triton kernel: the norm folded into the GEMM.

Why: a BasicTransformerBlock normalises its residual stream three times, and each norm feeds exactly one GEMM:
norm1 -> the fused Q/K/V projection, norm2 -> the cross-attention's query, norm3 -> the feed-forward's GEGLU.
Compiled, each norm is an Inductor kernel of its own (2.7-7.4 us at 256x384, 48 a step: about 0.2 ms of a 3.5 ms
step with their gaps, H100; bench/NOTES.md, session 11).

How: LN(x) @ W = rstd * (x @ W' - mean * u) + v, with W' = diag(gamma) W, u = the column sums of W' and
v = beta @ W + bias: the norm's affine folds into the weight and two per-column vectors, made once at build time
(`NormLinear`). So the GEMM runs on the raw rows (A and W' tiles by TMA straight into the tensor cores, as the
step's GEGLU kernel does), each program sums x and x^2 over its rows from the A tiles it loads anyway, and the
epilogue applies the per-row mean and rstd. A first version that normalised every A tile in registers before the
dot was 1.1-2.1x slower than norm + GEMM on every step shape (bench/NOTES.md, session 11).

Measured (one H100, `python3 -m bench.norm_matmul`, session 11): this folded form is slower than the norm's kernel +
the GEMM on every step shape too (20 shapes: 302 -> 412 us). The statistics cost the time: with (mean, rstd) given
(`norm_matmul_kernel(stats=2)`, an experiment) the kernel is within -2.7..+2.6 us of norm + GEMM. So the pre-norm
form is opt-in and off (CNRT_NORM_MATMUL=1); it would pay only where the statistics come for free, e.g. from the
epilogue of the GEMM that writes the stream.

The residual stream without its biases: the residual adds of the block run inside cuBLAS (`residual_gemm`,
c += a @ W), which cannot add a bias there. So the stream is kept as h - offset, where the offset (a per-channel
vector known when the model is built, `PendingBiases`) is the sum of the biases not yet added. The norm needs
x + shift: its statistics take the shift in, and the product gains rstd * (shift @ W') (a third per-column vector).

Numerics: statistics in fp32 over x + shift (the x's are the fp16 stream), shifted by each row's mean over its first
64 columns against cancellation; fp32 accumulation of the fp16 x against the fp16 W' (the folded weight is rounded
once, where the unfused form rounds the normalised row instead); one rounding of the result. `reference` is the same
arithmetic in torch (the CPU path); in fp32 it equals LayerNorm then the linear layer (tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch_fast import pdl, triton_geglu
from profiles.config import env_flag

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None

# Opt-in, off (slower per shape, see "Measured" above). 1: the transformers run the pre-norm form
# (parts.prenorm_transformers)
ENABLED = env_flag("CNRT_NORM_MATMUL", False)
BLOCK_K = 64

if triton is not None:
    from engines.torch_fast.pdl import pdl_begin  # its own name: Inductor re-emits a traced kernel's callees by name
    from engines.torch_fast.triton_geglu import _weight_tile

    @triton.jit
    def _affine(acc, mean, rstd, u_ptr, c_ptr, v_ptr, cols, n_ok, HAS_SHIFT: tl.constexpr):
        """rstd * (acc - mean * u + c) + v for the product columns `cols` (c: the shift's product, if any)."""
        u = tl.load(u_ptr + cols, mask=n_ok, other=0.0)
        v = tl.load(v_ptr + cols, mask=n_ok, other=0.0)
        y = acc - mean[:, None] * u[None, :]
        if HAS_SHIFT:
            y += tl.load(c_ptr + cols, mask=n_ok, other=0.0)[None, :]
        return y * rstd[:, None] + v[None, :]

    @triton.jit
    def _norm_matmul_kernel(a_desc, a_ptr, shift_ptr, w_desc, u_ptr, c_ptr, v_ptr, out_ptr, M, N_OUT,
                            s_sg, s_cg, s_og, s_om, eps,
                            K: tl.constexpr, HAS_SHIFT: tl.constexpr, GEGLU: tl.constexpr, W_KN: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PDL: tl.constexpr = False, STATS: tl.constexpr = 0, stats_ptr=None):
        """out[g] = LN(a[g] + shift[g]) @ W[g] through the folded weight W' (see the module docstring), or with
        GEGLU hidden * gelu(gate) of the 2 * N_OUT wide product. a: (G * M, K) rows (a_desc over them; tiles past
        a group's rows read the next group's and are not stored); shift at group stride s_sg (0: shared); u, c, v:
        (G, columns) at stride s_cg; w_desc: (G * K, columns) if W_KN (stacked (in, out) matrices) else the
        (columns, K) Linear-layout weight, read transposed."""
        pdl_begin(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_k = tl.arange(0, BLOCK_K)
        row0 = g * M + pid_m * BLOCK_M
        # The pivot: each row's mean of x + shift over the first BLOCK_K columns (the statistics sum x - pivot).
        x0 = tl.load(a_ptr + (g * M + offs_m)[:, None] * K + offs_k[None, :], mask=m_ok[:, None],
                     other=0.0).to(tl.float32)
        if HAS_SHIFT:
            x0 += tl.load(shift_ptr + g * s_sg + offs_k)[None, :]
        pivot = tl.sum(x0, 1) / BLOCK_K
        s1 = tl.zeros([BLOCK_M], tl.float32)
        s2 = tl.zeros([BLOCK_M], tl.float32)
        n0 = pid_n * BLOCK_N
        acc_h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([row0, k0])
            acc_h = tl.dot(a, _weight_tile(w_desc, g, K, k0, n0, W_KN), acc_h)
            if GEGLU:  # the gate's columns follow the hidden ones
                acc_g = tl.dot(a, _weight_tile(w_desc, g, K, k0, N_OUT + n0, W_KN), acc_g)
            if STATS == 0:
                d = a.to(tl.float32) - pivot[:, None]
            elif STATS == 1:  # experiment (bench.norm_matmul): the statistics from a second, pointer load of the tile
                d = tl.load(a_ptr + (g * M + offs_m)[:, None] * K + k0 + offs_k[None, :], mask=m_ok[:, None],
                            other=0.0).to(tl.float32) - pivot[:, None]
            if STATS < 2:
                if HAS_SHIFT:
                    d += tl.load(shift_ptr + g * s_sg + k0 + offs_k)[None, :]
                s1 += tl.sum(d, 1)
                s2 += tl.sum(d * d, 1)
        if STATS < 2:
            mean_d = s1 / K
            var = tl.maximum(s2 / K - mean_d * mean_d, 0.0)
            mean = pivot + mean_d
            rstd = 1.0 / tl.sqrt(var + eps)
        else:  # experiment: (mean, rstd) per row given (the GEMM alone, as a lower bound)
            mean = tl.load(stats_ptr + 2 * (g * M + offs_m), mask=m_ok, other=0.0)
            rstd = tl.load(stats_ptr + 2 * (g * M + offs_m) + 1, mask=m_ok, other=0.0)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_OUT
        cols = g * s_cg + offs_n
        out = _affine(acc_h, mean, rstd, u_ptr, c_ptr, v_ptr, cols, n_ok, HAS_SHIFT)
        if GEGLU:  # the gate's columns follow the hidden ones
            gate = _affine(acc_g, mean, rstd, u_ptr, c_ptr, v_ptr, cols + N_OUT, n_ok, HAS_SHIFT)
            out = out * (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)))
        tl.store(out_ptr + g * s_og + offs_m[:, None] * s_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    # (BLOCK_M, BLOCK_N, num_warps, num_stages) tried per shape: the GEGLU kernel's TMA tiles, whose pre-hook sets
    # the descriptors' block shapes (same argument names: a_desc, w_desc, W_KN)
    TILES = triton_geglu.TMA_TILES

    def _prune(configs, nargs, **kwargs):
        """GEGLU halves of whole tiles; no tile wider than the output or taller than the rows needs."""
        args = {**nargs, **kwargs}  # the constexpr flags arrive as keyword arguments
        keep = [c for c in configs
                if (not args["GEGLU"] or args["N_OUT"] % c.kwargs["BLOCK_N"] == 0)
                and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(args["N_OUT"]))
                and c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(args["M"]))]
        return keep or configs[:1]

    _norm_matmul_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st,
                               pre_hook=triton_geglu._set_tma_blocks) for bm, bn, w, st in TILES],
        key=["M", "N_OUT", "K", "W_KN", "GEGLU", "HAS_SHIFT", "STATS"],
        prune_configs_by={"early_config_prune": _prune})(_norm_matmul_kernel)


def fold(norm_weight: torch.Tensor, norm_bias: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None",
         shift: "torch.Tensor | None") -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]":
    """(W', u, c, v) for LN(x + shift) @ W + bias = rstd * (x @ W' - mean * u + c) + v.

    weight: nn.Linear layout (N, K), or stacked (G, K, N); the vectors (K,) or (G, K), bias (N,) or (G, N).
    W' = diag(gamma) W in the weight's layout and dtype (rounded once); u: column sums of the ROUNDED W' (so
    mean * u removes exactly the mean the GEMM's rows carry); c = shift @ W' (None without a shift); v = beta @ W
    + bias. u, c, v are fp32 (G', N) with G' = G, or 1 for a Linear-layout weight."""
    linear = weight.dim() == 2
    k = weight.shape[1]
    w = (weight.t()[None] if linear else weight).float()  # (G, K, N)

    def per_group(v):  # (K,) or (G, K) -> (G or 1, 1, K)
        return v.float().reshape(-1, 1, k)

    folded = (w * per_group(norm_weight).transpose(1, 2)).to(weight.dtype)  # gamma scales W's input rows
    u = folded.float().sum(1)
    v = torch.matmul(per_group(norm_bias), w)[:, 0]
    if bias is not None:
        v = v + bias.float().reshape(-1, v.shape[-1])
    c = None if shift is None else torch.matmul(per_group(shift), folded.float())[:, 0]
    folded = folded[0].t().contiguous() if linear else folded.contiguous()
    return folded, u.contiguous(), None if c is None else c.contiguous(), v.contiguous()


def output_width(weight: torch.Tensor, geglu: bool) -> int:
    n = weight.shape[0] if weight.dim() == 2 else weight.shape[2]
    return n // 2 if geglu else n


def fits(x: torch.Tensor, weight: torch.Tensor, geglu: bool) -> bool:
    """Shapes the kernel takes: K a multiple of BLOCK_K, 16-byte weight rows (TMA), GEGLU halves of whole tiles."""
    k = x.shape[-1]
    n = output_width(weight, geglu)
    return k % BLOCK_K == 0 and n % 8 == 0 and (not geglu or n % 64 == 0)


def _check(x, weight, u, v, shift, c):
    k = x.shape[-1]
    if weight.shape[1] != k:  # (G, K, N) stacked or (N, K) Linear
        raise ValueError(f"norm_matmul: weight {tuple(weight.shape)} does not take {k} input channels")
    if u.shape != v.shape or (c is not None and c.shape != u.shape) or (shift is None) != (c is None):
        raise ValueError("norm_matmul: u, v (and c, given with a shift) must be (G, N) vectors of one shape")


def norm_matmul_kernel(x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float,
                       shift: "torch.Tensor | None" = None, c: "torch.Tensor | None" = None, geglu: bool = False,
                       config: "tuple[int, int, int, int] | None" = None, stats: int = 0,
                       given: "torch.Tensor | None" = None) -> torch.Tensor:
    """The kernel itself (arguments as `norm_matmul`). config: (BLOCK_M, BLOCK_N, num_warps, num_stages); None
    autotunes per shape over TILES (needs a GPU). The Triton interpreter runs it on the CPU.

    stats (experiments, `bench.norm_matmul`): 0 the statistics from the A tiles the GEMM loads (the operator's
    form); 1 from a second load of each tile by pointers; 2 given, `given` holding (mean, rstd) per row of
    x + shift as (G * M, 2) fp32: the GEMM and epilogue alone, the bound a free source of statistics would reach."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not fits(x, weight, geglu):
        raise ValueError(f"norm_matmul: K={x.shape[-1]} must be a multiple of {BLOCK_K}, the output width a multiple "
                         f"of 8 (of 64 with GEGLU); weight {tuple(weight.shape)}")
    _check(x, weight, u, v, shift, c)
    w_kn = weight.dim() == 3
    groups = weight.shape[0] if w_kn else 1
    k = x.shape[-1]
    n_out = output_width(weight, geglu)
    a = x.reshape(groups, -1, k).contiguous()
    m = a.shape[1]
    rows = a.reshape(groups * m, k)
    sh = None if shift is None else shift.float().reshape(-1, k).contiguous()
    block_m, block_n, warps, stages = config or (64, 64, 4, 3)  # autotuning resets the descriptors' blocks
    a_desc = TensorDescriptor.from_tensor(rows, [block_m, BLOCK_K])
    w_desc = (TensorDescriptor.from_tensor(weight.contiguous().reshape(groups * k, -1), [BLOCK_K, block_n])
              if w_kn else TensorDescriptor.from_tensor(weight.contiguous(), [block_n, BLOCK_K]))
    out = torch.empty(groups, m, n_out, device=x.device, dtype=x.dtype)
    args = (a_desc, rows, sh if sh is not None else u, w_desc, u, c if c is not None else u, v, out, m, n_out,
            0 if sh is None or sh.shape[0] == 1 else k, 0 if u.shape[0] == 1 else u.stride(0), out.stride(0),
            out.stride(1), eps)
    flags = dict(K=k, HAS_SHIFT=sh is not None, GEGLU=geglu, W_KN=w_kn, BLOCK_K=BLOCK_K,
                 **pdl.launch_args(x.device))
    if stats:  # experiments (bench.norm_matmul): where the statistics come from
        flags.update(STATS=stats, stats_ptr=given if given is not None else u)
    if config is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n_out, meta["BLOCK_N"]), groups)  # noqa: E731
        _norm_matmul_tuned[grid](*args, **flags)
    else:
        _norm_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n_out, block_n), groups)](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out.reshape(*x.shape[:-1], n_out)


def reference(x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float,
              shift: "torch.Tensor | None" = None, c: "torch.Tensor | None" = None,
              geglu: bool = False) -> torch.Tensor:
    """The kernel's arithmetic in torch: statistics of x + shift in fp32, the product of the raw x with W', then
    rstd * (product - mean * u + c) + v (and GEGLU), rounded once to x's dtype."""
    k = x.shape[-1]
    stacked = weight.dim() == 3
    groups = weight.shape[0] if stacked else 1
    xs = x.float().reshape(groups, -1, k)
    if shift is not None:
        xs = xs + shift.float().reshape(-1, 1, k)
    var, mean = torch.var_mean(xs, dim=-1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    w = weight.float() if stacked else weight.float().t()[None]
    product = torch.matmul(x.float().reshape(groups, -1, k), w) - mean * u[:, None, :]
    if c is not None:
        product = product + c[:, None, :]
    y = product * rstd + v[:, None, :]
    if geglu:
        hidden, gate = y.chunk(2, dim=-1)
        y = hidden * F.gelu(gate)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


if triton is not None:

    @torch.library.custom_op("cnrt::norm_matmul", mutates_args=(), device_types="cuda")
    def _norm_matmul_op(x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float,
                        shift: Optional[torch.Tensor], c: Optional[torch.Tensor], geglu: bool) -> torch.Tensor:
        return norm_matmul_kernel(x, weight, u, v, eps, shift, c, geglu)

    @_norm_matmul_op.register_fake
    def _(x, weight, u, v, eps, shift, c, geglu):
        return x.new_empty(*x.shape[:-1], output_width(weight, geglu))


def norm_matmul(x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float,
                shift: "torch.Tensor | None" = None, c: "torch.Tensor | None" = None,
                geglu: bool = False) -> torch.Tensor:
    """LayerNorm(x + shift) @ W + bias through the folded form (`fold` makes weight = W', u, c, v); with geglu,
    hidden * gelu(gate) of the product's two halves.

    x (rows.., K) with a Linear-layout weight (N, K), or x (G, M, K) with a stacked (G, K, N) one; u, v, c (G', N)
    fp32; shift (K,) or (G, K). On CUDA, where the kernel takes the shape, one Triton launch (the operator
    cnrt::norm_matmul, which torch.compile keeps whole); elsewhere `reference`."""
    if triton is not None and x.is_cuda and fits(x, weight, geglu):
        return torch.ops.cnrt.norm_matmul(x, weight, u, v, eps, shift, c, geglu)
    return reference(x, weight, u, v, eps, shift, c, geglu)


class NormLinear(nn.Module):
    """A LayerNorm (weight, bias, eps) of x + shift and the linear layer after it (weight in nn.Linear layout
    (N, K) or stacked (G, K, N), bias or None), held folded (`fold`); with geglu the layer is GEGLU's projection
    and forward returns hidden * gelu(gate). forward(x) = `norm_matmul` of x."""

    def __init__(self, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, weight: torch.Tensor,
                 bias: "torch.Tensor | None" = None, shift: "torch.Tensor | None" = None, geglu: bool = False):
        super().__init__()
        with torch.no_grad():
            folded, u, c, v = fold(norm_weight, norm_bias, weight, bias, shift)
        self.register_buffer("weight", folded, persistent=False)
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.register_buffer("c", c, persistent=False)
        self.register_buffer("shift", None if shift is None else shift.detach().float().contiguous(),
                             persistent=False)
        self.eps = eps
        self.geglu = geglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_matmul(x, self.weight, self.u, self.v, self.eps, self.shift, self.c, self.geglu)


class PendingBiases(nn.Module):
    """The offsets of one Transformer2DModel's residual stream, kept without its biases (see the module docstring).

    start: the bias the stream starts without ((C,) or the twin's (G, C); None: it starts whole); block_biases:
    per BasicTransformerBlock, the biases of the three projections that write the stream, (attn1.to_out, attn2.to_out,
    ff2), each (C,) / (G, C) or None; proj_out_weight (C, C_out) / (G, C, C_out) (in, out) and its bias.

    `shift(i, j)`: what norm j (0, 1, 2) of block i adds back before normalising (None: nothing pending), in fp32.
    `proj_out_bias`: proj_out's bias plus the product of the biases still pending at the end with proj_out's weight,
    so that proj_out of the bias-free stream, plus this bias, is proj_out of the whole one."""

    def __init__(self, start: "torch.Tensor | None", block_biases: list, proj_out_weight: torch.Tensor,
                 proj_out_bias: "torch.Tensor | None"):
        super().__init__()
        pending = None if start is None else start.detach().float()
        for i, biases in enumerate(block_biases):
            for j, bias in enumerate(biases):
                self.register_buffer(f"shift_{i}_{j}", pending, persistent=False)
                if bias is not None:
                    pending = bias.detach().float() if pending is None else pending + bias.detach().float()
        weight = proj_out_weight.detach().float()
        final = None if proj_out_bias is None else proj_out_bias.detach().float()
        if pending is not None:
            carried = (pending @ weight if weight.dim() == 2 else torch.bmm(pending[:, None, :], weight)[:, 0])
            final = carried if final is None else final + carried
        self.register_buffer("proj_out_bias", None if final is None else final.to(proj_out_weight.dtype),
                             persistent=False)

    def shift(self, block: int, norm: int) -> "torch.Tensor | None":
        return getattr(self, f"shift_{block}_{norm}")


class PrenormTransformer(nn.Module):
    """The pre-norm form's layers of one Transformer2DModel: per BasicTransformerBlock the three `NormLinear`s
    (norm1 + fused Q/K/V, norm2 + the cross-attention's query, norm3 + GEGLU), each with the biases pending there
    (`PendingBiases`), and `proj_out_bias`: proj_out's bias with what is pending at the end folded in.

    start: the bias the stream starts without (the twin's proj_in bias; None: it starts whole). blocks: per block
    (norms, qkv_weight, q_weight, (ff_weight, ff_bias), (out1_bias, out2_bias, ff2_bias)), norms being three
    (weight, bias, eps); weights in nn.Linear layout or stacked (G, K, N), as `NormLinear` takes them."""

    def __init__(self, start: "torch.Tensor | None", blocks: list, proj_out_weight: torch.Tensor,
                 proj_out_bias: "torch.Tensor | None"):
        super().__init__()
        pending = PendingBiases(start, [blk[4] for blk in blocks], proj_out_weight, proj_out_bias)
        self.layers = nn.ModuleList()
        for i, (norms, qkv, q, (ff, ff_bias), _) in enumerate(blocks):
            self.layers.append(nn.ModuleList([
                NormLinear(*norms[0], qkv, None, pending.shift(i, 0)),
                NormLinear(*norms[1], q, None, pending.shift(i, 1)),
                NormLinear(*norms[2], ff, ff_bias, pending.shift(i, 2), geglu=True)]))
        self.register_buffer("proj_out_bias", pending.proj_out_bias, persistent=False)
