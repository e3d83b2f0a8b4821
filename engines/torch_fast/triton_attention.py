"""Attention for the step's small shapes in one Triton kernel, used instead of cuDNN SDPA there.

Why: in the captured loop every cuDNN attention call is a memset plus the attention kernel, with 3-6 us of idle
time before the kernel where 0.4 us is usual between kernels: about 180 us a step, 3.6 ms a loop on an H200
(bench/NOTES.md, session 4). Most calls are small: the cross-attentions (77 text tokens, every level) and the
self-attentions at levels 1-3 (384, 96 and 24 tokens). This kernel is one launch with no memset: one program per
(BLOCK_M queries, image, head), an online softmax over BLOCK_N keys at a time; head size 40 is padded to 64 in
registers only, 80 and 160 run as two exact column blocks (`head_blocks`).

`sdpa` is what the step calls: this kernel (as the operator cnrt::triton_attention, which torch.compile keeps
whole) up to MAX_PAIRS query-key pairs a call; above it the Gluon kernel (`gluon_attention`, the 32x48
self-attentions) where it applies, else cuDNN SDPA (on the step's shapes, since the twenty-second session, never).
Checked against F.scaled_dot_product_attention under Triton's interpreter (CPU tests) and on an H200 (GPU tests);
`python3 -m bench.attention_backends` times both per shape.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from engines.torch_fast import gluon_attention, pdl
from profiles.config import env_flag

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None


VEC = 8  # elements in 16 bytes of fp16: head sizes and strides must be multiples of it

if triton is not None:
    # their own names: Inductor re-emits a traced kernel's callees by name
    from engines.torch_fast.pdl import pdl_begin, pdl_end

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr,
                          sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
                          HEADS, TQ, TK, qk_scale, HEAD_D: tl.constexpr, VEC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_D2: tl.constexpr, EVEN_N: tl.constexpr, PDL: tl.constexpr = False):
        # Strides come in units of VEC elements and the head size is a constant, so the compiler knows every row
        # starts 16-byte aligned and the head-size mask is constant over 8 lanes: 16-byte loads even for d = 40
        # (a runtime d or stride of 40 would be divisible by 8 but not 16, and Triton would load element-wise).
        # The head is BLOCK_D columns, plus BLOCK_D2 more when BLOCK_D2 > 0: d = 80 as 64 + 16 and 160 as
        # 128 + 32 (not 128 and 256), so the matmuls do no padded work (see head_blocks).
        # EVEN_N: TK is a multiple of BLOCK_N, so no key needs masking.
        pdl_begin(PDL)
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HEADS
        h = pid_bh - b * HEADS
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D
        m_ok = offs_m < TQ
        q_rows = q_ptr + (b * sq_b + h * sq_h) * VEC + offs_m[:, None] * (sq_t * VEC)
        q = tl.load(q_rows + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k_ptr + (b * sk_b + h * sk_h) * VEC
        v_base = v_ptr + (b * sv_b + h * sv_h) * VEC
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row maximum, in log2 units (x qk_scale)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if BLOCK_D2 > 0:
            offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            d2_ok = offs_d2 < HEAD_D
            q2 = tl.load(q_rows + offs_d2[None, :], mask=m_ok[:, None] & d2_ok[None, :], other=0.0)
            acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
        for start in range(0, TK, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < TK
            k = tl.load(k_base + offs_n[None, :] * (sk_t * VEC) + offs_d[:, None],
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            s = tl.dot(q, k)
            if BLOCK_D2 > 0:
                k2 = tl.load(k_base + offs_n[None, :] * (sk_t * VEC) + offs_d2[:, None],
                             mask=n_ok[None, :] & d2_ok[:, None], other=0.0)
                s = tl.dot(q2, k2, s)
            if not EVEN_N:
                s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale > 0: max(s) * scale = max(s * scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s * qk_scale - m_new[:, None])  # log2 units: qk_scale carries 1/ln(2); one FMA a score
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(q.dtype)
            v = tl.load(v_base + offs_n[:, None] * (sv_t * VEC) + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            acc = tl.dot(p, v, acc * alpha[:, None])
            if BLOCK_D2 > 0:
                v2 = tl.load(v_base + offs_n[:, None] * (sv_t * VEC) + offs_d2[None, :],
                             mask=n_ok[:, None] & d2_ok[None, :], other=0.0)
                acc2 = tl.dot(p, v2, acc2 * alpha[:, None])
            m_i = m_new
        pdl_end(PDL)
        o_rows = o_ptr + (b * so_b + h * so_h) * VEC + offs_m[:, None] * (so_t * VEC)
        tl.store(o_rows + offs_d[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        if BLOCK_D2 > 0:
            tl.store(o_rows + offs_d2[None, :], (acc2 / l_i[:, None]).to(o_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & d2_ok[None, :])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates that bench.attention_backends sweeps per shape.
CONFIGS = ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 2),
           (128, 128, 8, 2), (128, 128, 8, 3), (64, 32, 4, 2), (32, 64, 4, 2), (16, 64, 4, 2))

# Up to this many query-key pairs per call (batch x heads x queries x keys) the step uses this kernel; above it
# the Gluon kernel or cuDNN SDPA (`sdpa`). H200, CUDA-graph time per call from `python3 -m bench.attention_backends`
# (bench/NOTES.md, session 5): every cross-attention (at most 3.8M pairs) and the self-attentions at 8x12 and below,
# plus the decoder's at 16x24 (2.4M), take 3.7-8.0 us here against cuDNN's 7.3-11.9. The twin's self-attention at
# 16x24 (4.7M pairs: 10.7 against 10.8 us) came here in the twenty-second session, with the Gluon kernel taking the
# 32x48 batch-4 call: no cuDNN SDPA is left in the step, nor its memsets, and the loop took 64.36 against 64.63 ms
# (one H100). The self-attentions at 32x48 (38M and 75M pairs) lost here against cuDNN (session 7: 31.1 us at
# batch 2 and 53.4 at batch 4 alone; in the loop 73.81 ms against 72.78 with everything on Triton) and run on the
# Gluon kernel since the twenty-first session. CNRT_TRITON_ATTENTION_MAX_PAIRS overrides the limit (experiments).
MAX_PAIRS = int(float(os.environ.get("CNRT_TRITON_ATTENTION_MAX_PAIRS", 5e6)))
ENABLED = env_flag("CNRT_TRITON_ATTENTION", True)  # 0: cuDNN SDPA everywhere (A/B measurements)


SPLIT_HEAD = env_flag("CNRT_ATTENTION_SPLIT_HEAD", True)  # 0: pad the head size to a power of two (A/B)


def head_blocks(head_size: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): the head size padded to a power of two, or, where it is the sum of two powers of two
    (the second >= 16, the matmul's minimum), those two: 80 -> 64 + 16, 160 -> 128 + 32, no padded columns.
    40 stays padded to 64: as 32 + 16 it measured slower at 32x48 on an H200 (33.7 against 31.1 us at batch 2;
    bench/NOTES.md), where the softmax, not the matmuls, bounds the kernel."""
    padded = max(16, 1 << (head_size - 1).bit_length())
    rest = head_size - padded // 2
    if SPLIT_HEAD and padded > 32 and rest >= 16 and rest & (rest - 1) == 0 and rest < padded // 2:
        return padded // 2, rest
    return padded, 0


def block_sizes(tq: int, tk: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one shape: the sweep's winners at the step's shapes (64 queries
    a program; 64 keys and 3 stages for the longer key sets, 32 and 2 for the 77 text tokens). The head's column
    blocks come from `head_blocks`."""
    if tk >= 1024:
        return 128, 64, 8, 3
    block_m = 64 if tq >= 64 else max(16, triton.next_power_of_2(tq))
    long_keys = tk >= 256
    return block_m, 64 if long_keys else 32, 4, 3 if long_keys else 2


def preferred(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether this kernel should run q k^T v for these inputs: a CUDA tensor, Triton present, few enough pairs."""
    return (ENABLED and q.is_cuda and triton is not None and q.shape[3] % VEC == 0
            and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= MAX_PAIRS)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v), through this kernel where `preferred` says it is faster, else
    through the Gluon kernel where `gluon_attention.preferred` (the 32x48 self-attentions, CNRT_GLUON_ATTENTION),
    else cuDNN SDPA."""
    if preferred(q, k):
        return torch.ops.cnrt.triton_attention(q, k, v)
    if gluon_attention.preferred(q, k, v):
        return torch.ops.cnrt.gluon_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              config: "tuple[int, int, int, int] | None" = None) -> torch.Tensor:
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
    if d % VEC:
        raise ValueError(f"the head size must be a multiple of {VEC}, got {d}")
    q, k, v = (t if all(st % VEC == 0 for st in t.stride()[:3]) else t.contiguous() for t in (q, k, v))
    block_m, block_n, warps, stages = config if config is not None else block_sizes(tq, k.shape[2])
    block_d, block_d2 = head_blocks(d)
    out = torch.empty(bq, tq, hq, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    grid = (triton.cdiv(tq, block_m), bq * hq)
    strides = [st // VEC for t in (q, k, v, out) for st in t.stride()[:3]]
    _attention_kernel[grid](
        q, k, v, out, *strides, hq, tq, k.shape[2], 1.0 / math.sqrt(d) / math.log(2), HEAD_D=d, VEC=VEC,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_D2=block_d2, EVEN_N=k.shape[2] % block_n == 0,
        num_warps=warps, num_stages=stages, **pdl.launch_args(q.device))
    return out


if triton is not None:

    @torch.library.custom_op("cnrt::triton_attention", mutates_args=(), device_types="cuda")
    def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`attention` as an operator torch.compile keeps whole (one kernel in the compiled part's graph)."""
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return attention(q, k, v)

    @_attention_op.register_fake
    def _(q, k, v):
        b, h, tq, d = q.shape
        return q.new_empty(b, tq, h, d).transpose(1, 2)
