"""A linear layer and the LayerNorm that follows it as ONE Triton kernel: h = residual + a @ W + b, n = LN(h).

Why: inside each BasicTransformerBlock a LayerNorm follows every projection that writes the residual stream:
proj_in -> norm1, attn1.to_out (+ h) -> norm2, attn2.to_out (+ h) -> norm3. Compiled, each pair is a cuBLAS GEMM and
an Inductor kernel that reads the product and h back, adds them and normalises: at the 32x48 level (320 channels,
3072 rows) the GEMM takes 4-5 us and the norm 2.5-3.5 us, most of both being launch and tail (bench/NOTES.md,
session 10). With at most a few hundred channels a program can hold whole rows: each computes BLOCK_M rows of the
product over all N columns (as two power-of-two column blocks, 320 = 256 + 64), adds bias and residual, rounds h
to fp16, and normalises those rows in registers. One kernel, and h is never read back.

Outputs: h (+ extra_bias, when given: the next accumulating GEMM's start, `residual_gemm`) and n = LN(h) * w + b,
with LN's statistics taken over the fp16-rounded h in fp32, as the unfused norm does. What differs from the
unfused form is one rounding: the product is added to the residual before rounding, not after.

`linear_norm` is what the transformers call: the kernel (as the operator cnrt::linear_norm, which torch.compile
keeps whole) on CUDA for widths it holds, else the same arithmetic in torch.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from profiles.config import env_flag

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None

# Opt-in, off: measured slower in the loop (one H100: 72.30 ms with 4 warps against 70.59 without; bench/NOTES.md,
# session 10). 1: the transformers take the fused form.
ENABLED = env_flag("CNRT_LINEAR_NORM", False)
MAX_WIDTH = int(os.environ.get("CNRT_LINEAR_NORM_MAX_WIDTH", "320"))  # widest N a program holds whole rows of
BLOCK_K = 64


def _tile() -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages) from CNRT_LINEAR_NORM_TILE (A/B measurements), else the default."""
    value = os.environ.get("CNRT_LINEAR_NORM_TILE", "").strip()
    if not value:
        return 64, 8, 3
    try:
        block_m, warps, stages = (int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"CNRT_LINEAR_NORM_TILE must be 'block_m,num_warps,num_stages', got {value!r}")
    return block_m, warps, stages


def column_blocks(n: int) -> "tuple[int, int] | None":
    """N as a sum of two powers of two (N1 >= N2, N2 may be 0), the column blocks a program computes; None when N
    is not such a sum."""
    if n <= 0:
        return None
    n1 = 1 << (n.bit_length() - 1)
    n2 = n - n1
    if n2 and n2 & (n2 - 1):
        return None
    return n1, n2


def fits(k: int, n: int) -> bool:
    """K in whole BLOCK_K steps, N at most MAX_WIDTH and two column blocks of at least 16 (or one)."""
    blocks = column_blocks(n)
    return (k % BLOCK_K == 0 and n <= MAX_WIDTH and blocks is not None and blocks[0] >= 16
            and (blocks[1] == 0 or blocks[1] >= 16))


if triton is not None:

    @triton.jit
    def _row_block(acc, bias_ptr, res_ptr, rows, cols, row_ok, HAS_RES: tl.constexpr):
        """acc + bias (+ the residual's tile), rounded to fp16 and returned in fp32."""
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + rows + cols[None, :], mask=row_ok, other=0.0).to(tl.float32)
        return acc.to(tl.float16).to(tl.float32)

    @triton.jit
    def _linear_norm_kernel(a_ptr, w_ptr, bias_ptr, res_ptr, nw_ptr, nb_ptr, extra_ptr, h_ptr, n_ptr,
                            M, K, s_ag, s_am, s_wg, s_wk, s_wn, s_vg, s_rg, s_og, eps,
                            N1: tl.constexpr, N2: tl.constexpr, HAS_RES: tl.constexpr, HAS_EXTRA: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """Rows [pid*BLOCK_M, +BLOCK_M) of group g: h = residual + a @ w + bias over all N1 + N2 columns, then
        n = LN(h) * nw + nb. w is (K, N) per group, any strides; residual, h and n are (M, N) row-major per group;
        the (N,) vectors are strided by s_vg per group."""
        N: tl.constexpr = N1 + N2
        pid = tl.program_id(0)
        g = tl.program_id(1)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = (offs_m < M)[:, None]
        offs_k = tl.arange(0, BLOCK_K)
        c1 = tl.arange(0, N1)
        a_tile = a_ptr + g * s_ag + offs_m[:, None] * s_am + offs_k[None, :]
        w_tile = w_ptr + g * s_wg + offs_k[:, None] * s_wk
        acc1 = tl.zeros([BLOCK_M, N1], tl.float32)
        if N2 > 0:
            c2 = N1 + tl.arange(0, N2)
            acc2 = tl.zeros([BLOCK_M, N2], tl.float32)
        for _ in range(0, K, BLOCK_K):
            a = tl.load(a_tile, mask=row_ok, other=0.0)
            acc1 = tl.dot(a, tl.load(w_tile + c1[None, :] * s_wn), acc1)
            if N2 > 0:
                acc2 = tl.dot(a, tl.load(w_tile + c2[None, :] * s_wn), acc2)
            a_tile += BLOCK_K
            w_tile += BLOCK_K * s_wk
        rows = g * s_rg + offs_m[:, None] * N
        v = g * s_vg
        x1 = _row_block(acc1, bias_ptr + v, res_ptr, rows, c1, row_ok, HAS_RES)
        total = tl.sum(x1, axis=1)
        if N2 > 0:
            x2 = _row_block(acc2, bias_ptr + v, res_ptr, rows, c2, row_ok, HAS_RES)
            total += tl.sum(x2, axis=1)
        mean = total / N
        d1 = x1 - mean[:, None]
        var = tl.sum(d1 * d1, axis=1)
        if N2 > 0:
            d2 = x2 - mean[:, None]
            var += tl.sum(d2 * d2, axis=1)
        rstd = tl.rsqrt(var / N + eps)[:, None]
        out = g * s_og + offs_m[:, None] * N
        n1 = d1 * rstd * tl.load(nw_ptr + v + c1).to(tl.float32)[None, :] + tl.load(nb_ptr + v + c1).to(tl.float32)
        tl.store(n_ptr + out + c1[None, :], n1.to(n_ptr.dtype.element_ty), mask=row_ok)
        if HAS_EXTRA:
            x1 += tl.load(extra_ptr + v + c1).to(tl.float32)[None, :]
        tl.store(h_ptr + out + c1[None, :], x1.to(h_ptr.dtype.element_ty), mask=row_ok)
        if N2 > 0:
            n2 = d2 * rstd * tl.load(nw_ptr + v + c2).to(tl.float32)[None, :] + \
                tl.load(nb_ptr + v + c2).to(tl.float32)
            tl.store(n_ptr + out + c2[None, :], n2.to(n_ptr.dtype.element_ty), mask=row_ok)
            if HAS_EXTRA:
                x2 += tl.load(extra_ptr + v + c2).to(tl.float32)[None, :]
            tl.store(h_ptr + out + c2[None, :], x2.to(h_ptr.dtype.element_ty), mask=row_ok)


def _groups_of(a: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a as (G, M, K) rows with unit column stride, weight as (G, K, N) (a view: the kernel takes its strides, so
    a transposed nn.Linear weight is read as it lies)."""
    if weight.dim() == 2:
        weight = weight[None]
        a = a.reshape(1, -1, a.shape[-1])
    else:
        a = a.reshape(weight.shape[0], -1, a.shape[-1])
    if a.stride(-1) != 1:
        a = a.contiguous()
    return a, weight


def _vectors(v: "torch.Tensor | None", groups: int, n: int) -> "torch.Tensor | None":
    return None if v is None else v.reshape(groups, n).contiguous()


def linear_norm_kernel(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                       norm_bias: torch.Tensor, eps: float, residual: "torch.Tensor | None" = None,
                       extra_bias: "torch.Tensor | None" = None,
                       tile: "tuple[int, int, int] | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel itself (see `linear_norm` for the arguments); -> (h, n), shaped like a with N columns.
    The Triton interpreter runs it on the CPU."""
    k, n = weight.shape[-2], weight.shape[-1]
    if not fits(k, n):
        raise ValueError(f"linear_norm: K={k} must be a multiple of {BLOCK_K} and N={n} at most {MAX_WIDTH}, a "
                         "sum of two powers of two")
    a3, w3 = _groups_of(a, weight)
    groups, m = w3.shape[0], a3.shape[1]
    out_shape = (*a.shape[:-1], n)
    h = torch.empty(groups, m, n, device=a.device, dtype=a.dtype)
    normed = torch.empty_like(h)
    res = None if residual is None else residual.reshape(groups, m, n).contiguous()
    b, nw, nb, extra = (_vectors(v, groups, n) for v in (bias, norm_weight, norm_bias, extra_bias))
    block_m, warps, stages = tile or _tile()
    n1, n2 = column_blocks(n)
    _linear_norm_kernel[(triton.cdiv(m, block_m), groups)](
        a3, w3, b, res if res is not None else h, nw, nb, extra if extra is not None else b, h, normed,
        m, k, a3.stride(0), a3.stride(1), w3.stride(0), w3.stride(1), w3.stride(2), b.stride(0), m * n, m * n, eps,
        N1=n1, N2=n2, HAS_RES=res is not None, HAS_EXTRA=extra is not None, BLOCK_M=block_m, BLOCK_K=BLOCK_K,
        num_warps=warps, num_stages=stages)
    return h.reshape(out_shape), normed.reshape(out_shape)


def reference(a, weight, bias, norm_weight, norm_bias, eps, residual=None, extra_bias=None):
    """The unfused arithmetic: the product (+ bias) rounded, + residual, LN over the last dimension."""
    if weight.dim() == 2:
        h = F.linear(a, weight.t(), bias)
        nw, nb, extra = norm_weight, norm_bias, extra_bias
    else:
        h = torch.bmm(a, weight) + bias[:, None, :]
        nw, nb = norm_weight[:, None, :], norm_bias[:, None, :]
        extra = None if extra_bias is None else extra_bias[:, None, :]
    if residual is not None:
        h = h + residual
    normed = F.layer_norm(h, (h.shape[-1],), eps=eps) * nw + nb
    return (h if extra is None else h + extra), normed


if triton is not None:

    @torch.library.custom_op("cnrt::linear_norm", mutates_args=(), device_types="cuda")
    def _linear_norm_op(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                        norm_bias: torch.Tensor, eps: float, residual: Optional[torch.Tensor],
                        extra_bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_norm_kernel(a, weight, bias, norm_weight, norm_bias, eps, residual, extra_bias)

    @_linear_norm_op.register_fake
    def _(a, weight, bias, norm_weight, norm_bias, eps, residual, extra_bias):
        shape = (*a.shape[:-1], weight.shape[-1])
        return a.new_empty(shape), a.new_empty(shape)


def holds(weight: torch.Tensor, bias: "torch.Tensor | None") -> bool:
    """Whether the transformers take the fused form for a layer with this (K, N) weight: enabled, a bias, and a
    width the kernel holds. (`linear_norm` then runs the kernel on CUDA, `reference` elsewhere: the same dataflow.)"""
    return ENABLED and bias is not None and fits(weight.shape[-2], weight.shape[-1])


def linear_norm(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                norm_bias: torch.Tensor, eps: float, residual: "torch.Tensor | None" = None,
                extra_bias: "torch.Tensor | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, n): h = residual + a @ weight + bias (+ extra_bias), n = LayerNorm(h without extra_bias) * norm_weight +
    norm_bias.

    a (..., K) with weight (K, N) and (N,) vectors, or a (G, M, K) with stacked weight (G, K, N) and (G, N)
    vectors (the twin encoder's); residual shaped like the output."""
    if triton is not None and a.is_cuda:
        return torch.ops.cnrt.linear_norm(a, weight, bias, norm_weight, norm_bias, eps, residual, extra_bias)
    return reference(a, weight, bias, norm_weight, norm_bias, eps, residual, extra_bias)
