"""Attention for the step's small shapes in one Triton kernel: a candidate to replace cuDNN SDPA there.

Why: in the captured loop every cuDNN attention call is a memset plus the attention kernel, with 3-6 us of idle
time before the kernel where 0.4 us is usual between kernels: about 180 us a step, 3.6 ms a loop on an H200
(bench/NOTES.md, session 4). Most calls are small: the cross-attentions (77 text tokens, every level) and the
self-attentions at levels 1-3 (384, 96 and 24 tokens). This kernel is one launch with no memset: one program per
(BLOCK_M queries, image, head), an online softmax over BLOCK_N keys at a time, head sizes 40 / 80 / 160 padded to
the next power of two in registers only.

Status: checked against F.scaled_dot_product_attention under Triton's interpreter (tests/test_triton_attention.py);
NOT yet timed on a GPU nor used by the step. `python3 -m bench.attention_backends` times it beside the SDPA
backends; wire it in where it wins.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None


if triton is not None:

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr,
                          sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
                          HEADS, TQ, TK, D, qk_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HEADS
        h = pid_bh - b * HEADS
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        m_ok = offs_m < TQ
        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, TK, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < TK
            k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_n[None, :] * sk_t + offs_d[:, None],
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            s = tl.dot(q, k) * qk_scale  # log2 units: qk_scale carries 1/ln(2)
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def available() -> bool:
    return triton is not None


def block_sizes(tq: int, head_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for TQ queries of one head size."""
    block_d = max(16, triton.next_power_of_2(head_size))
    block_m = 64 if tq >= 64 else max(16, triton.next_power_of_2(tq))
    return block_m, 64, block_d, 8 if block_d >= 256 else 4


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, TQ, d), k and v (B, H, TK, d), no mask: what
    F.scaled_dot_product_attention(q, k, v) computes. Any strides with a unit last stride (the step's head-split
    views). The output is (B, H, TQ, d) laid out as (B, TQ, H, d), so merging the heads back is a free view."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"q, k, v must be (B, H, T, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bq, hq, tq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (bq, hq) or k.shape[3] != d:
        raise ValueError(f"k and v must be (B, H, TK, d) for q {tuple(q.shape)}; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a unit stride along the head size")
    block_m, block_n, block_d, warps = block_sizes(tq, d)
    out = torch.empty(bq, tq, hq, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    grid = (triton.cdiv(tq, block_m), bq * hq)
    _attention_kernel[grid](
        q, k, v, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, tq, k.shape[2], d, 1.0 / math.sqrt(d) / math.log(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return out
