"""Cross-attention with its query and output projections folded into per-prompt matrices: two launches, not three.

Why: every transformer block of the step has a cross-attention over the 77 text tokens: the query projection (a
GEMM), the attention (our Triton kernel) and the output projection (a GEMM). At the 16 blocks of a step each of the
three is a 4-11 us launch-bound kernel (H100 sequence, bench/NOTES.md, thirteenth session). But the keys and values
come from the prompt alone, so the two projections fold into them once per prompt:

    scores_h = (x Wq_h^T) K_h^T * s  = x A_h,   A_h = s Wq_h^T K_h^T   (C x 77)
    out      = sum_h P_h V_h Wo_h^T  = P B,     B_h = V_h Wo_h^T       (77 x C_out), stacked over the heads

with P_h = softmax(x A_h) row by row. So a block runs one Triton kernel (x A and a softmax per head in its epilogue,
P written in fp16) and one batched GEMM (P B), and the output projection's bias stays where it was.

A and B are per image of the CFG batch (each image has its own text), built by `fold` in fp32 from the fp32 weights
and rounded once to fp16. Each head's 77 keys are padded to `KEYS_PADDED` = 80 = 64 + 16 columns, which the kernel
runs as two exact column blocks (no padded MMA work); the padded scores are masked out of the softmax and the padded
rows of B are zero.

Measured on an H100 (bench/NOTES.md, thirteenth session): loop 69.49 against 70.57 ms in one `bench.ab` call;
per call (`python3 -m bench.folded_cross`) 87.4-87.8 us against 104.6-106.6 us over the step's seven shapes, with
twin 32x48 the one shape not faster (its 8 x 80 score columns exceed C = 320 there).

`attend` is what the step calls: the kernel as the operator cnrt::folded_cross_scores on CUDA (torch.compile keeps it
whole), its torch reference elsewhere. CNRT_FOLDED_CROSS=0 runs the three-launch form (A/B measurements).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engines.torch_fast import linear_norm, norm_matmul, pdl
from engines.torch_fast.triton_attention import head_blocks
from profiles.config import env_flag

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None

ENABLED = env_flag("CNRT_FOLDED_CROSS", True)
TEXT_TOKENS = 77  # CLIP's context length: the keys of every cross-attention
KEYS_PADDED = 80  # per head, as 64 + 16 columns
BLOCK_K = 64


def active() -> bool:
    """Whether the step's cross-attentions run folded: asked for and not replaced by the opt-in forms that fuse the
    norms into their own kernels (`norm_matmul`, `linear_norm`), which keep the plain K / V."""
    return ENABLED and not norm_matmul.ENABLED and not linear_norm.ENABLED


def _heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


@torch.no_grad()
def fold(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one diffusers cross-attention (`attn2`) for a batch of text contexts (NB, 77, C_ctx):
    A (NB, C, heads * KEYS_PADDED) and B (NB, heads * KEYS_PADDED, C_out), in the weights' dtype. See the module
    docstring; K and V are recomputed in fp32 here instead of rounding them to fp16 first."""
    heads = attn.heads
    if attn.to_q.bias is not None or attn.to_k.bias is not None or attn.to_v.bias is not None:
        raise ValueError("folded cross-attention needs bias-free query / key / value projections (SD1.5 has them)")
    ctx = context.float()
    k = _heads_first(F.linear(ctx, attn.to_k.weight.float()), heads)  # (NB, H, T, d)
    v = _heads_first(F.linear(ctx, attn.to_v.weight.float()), heads)
    if k.shape[2] != TEXT_TOKENS:
        raise ValueError(f"folded cross-attention expects {TEXT_TOKENS} text tokens, got {k.shape[2]}")
    scale = getattr(attn, "scale", None) or 1.0 / math.sqrt(k.shape[3])
    return fold_matrices(attn.to_q.weight, attn.to_out[0].weight, k, v, scale)


def fold_matrices(wq: torch.Tensor, wo: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The arithmetic of `fold`: (A, B) from the query weight wq (H*d, C), the output weight wo (C_out, H*d) and the
    head-split keys / values k, v (NB, H, 77, d), formed in fp32 and rounded once to wq's dtype."""
    nb, heads, tokens, d = k.shape
    wq32, wo32 = wq.float(), wo.float()
    a = torch.einsum("hdc,bhkd->bchk", wq32.reshape(heads, d, wq.shape[1]), k.float()) * scale  # (NB, C, H, T)
    b = torch.einsum("bhkd,ohd->bhko", v.float(), wo32.reshape(wo.shape[0], heads, d))  # (NB, H, T, C_out)
    pad = KEYS_PADDED - tokens
    a = F.pad(a, (0, pad)).reshape(nb, wq.shape[1], heads * KEYS_PADDED)
    b = F.pad(b, (0, 0, 0, pad)).reshape(nb, heads * KEYS_PADDED, wo.shape[0])
    return a.to(wq.dtype).contiguous(), b.to(wq.dtype).contiguous()


def scores_reference(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """P = softmax(x A) per head over its first TEXT_TOKENS columns (the rest zero): x (NX, T, C) with NB a multiple of
    NX (image b reads x[b // (NB // NX)]), A (NB, C, H * KEYS_PADDED) -> P (NB, T, H * KEYS_PADDED) in x's dtype.
    What the kernel computes, in fp32, for CPU runs and the tests."""
    nb, nx = a.shape[0], x.shape[0]
    if nb % nx:
        raise ValueError(f"{nb} images of A cannot share {nx} images of x")
    xs = x.float().repeat_interleave(nb // nx, dim=0)
    s = torch.bmm(xs, a.float())
    s = s.reshape(nb, x.shape[1], -1, KEYS_PADDED)
    s[..., TEXT_TOKENS:] = float("-inf")
    return torch.softmax(s, dim=-1).reshape(nb, x.shape[1], -1).to(x.dtype)


if triton is not None:
    # their own names: Inductor re-emits a traced kernel's callees by name
    from engines.torch_fast.pdl import pdl_begin, pdl_end

    @triton.jit
    def _folded_cross_scores_kernel(x_ptr, a_ptr, p_ptr, TOKENS, C, X_SHARE, KEYS: tl.constexpr,
                                    HEADS: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
                                    EVEN_K: tl.constexpr, PDL: tl.constexpr = False):
        # One program: BLOCK_M rows (tokens) of image b, one head; scores x A_h over C in BLOCK_K steps as two exact
        # column blocks (BLOCK_N + BLOCK_N2 = KP), then the softmax in registers and P_h in fp16. EVEN_K: C is a
        # multiple of BLOCK_K (every SD1.5 width), so no channel mask.
        pdl_begin(PDL)
        pid_m = tl.program_id(0)
        head = tl.program_id(1)
        b = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < TOKENS
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = tl.arange(0, BLOCK_N)
        offs_n2 = BLOCK_N + tl.arange(0, BLOCK_N2)
        x_rows = x_ptr + ((b // X_SHARE) * TOKENS + offs_m[:, None]).to(tl.int64) * C
        a_cols = a_ptr + b.to(tl.int64) * C * (HEADS * KP) + head * KP
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N2], tl.float32)
        for k0 in range(0, C, BLOCK_K):
            a_rows = a_cols + (k0 + offs_k)[:, None] * (HEADS * KP)
            if EVEN_K:
                x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
                a = tl.load(a_rows + offs_n[None, :])
                a2 = tl.load(a_rows + offs_n2[None, :])
            else:
                k_ok = (k0 + offs_k) < C
                x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                a = tl.load(a_rows + offs_n[None, :], mask=k_ok[:, None], other=0.0)
                a2 = tl.load(a_rows + offs_n2[None, :], mask=k_ok[:, None], other=0.0)
            acc = tl.dot(x, a, acc)
            acc2 = tl.dot(x, a2, acc2)
        pdl_end(PDL)
        acc2 = tl.where((offs_n2 < KEYS)[None, :], acc2, float("-inf"))  # the padded keys
        row_max = tl.maximum(tl.max(acc, 1), tl.max(acc2, 1))
        log2e = 1.4426950408889634
        p = tl.exp2((acc - row_max[:, None]) * log2e)
        p2 = tl.exp2((acc2 - row_max[:, None]) * log2e)
        inv = 1.0 / (tl.sum(p, 1) + tl.sum(p2, 1))
        p_rows = p_ptr + (b * TOKENS + offs_m[:, None]).to(tl.int64) * (HEADS * KP) + head * KP
        tl.store(p_rows + offs_n[None, :], (p * inv[:, None]).to(p_ptr.dtype.element_ty), mask=m_ok[:, None])
        tl.store(p_rows + offs_n2[None, :], (p2 * inv[:, None]).to(p_ptr.dtype.element_ty), mask=m_ok[:, None])


BLOCK_M = 64  # rows a program; 64 beat 32 even at 24 tokens (`python3 -m bench.folded_cross`)


def scores(x: torch.Tensor, a: torch.Tensor, block_m: int = BLOCK_M, num_warps: int = 4,
           num_stages: int = 4, block_k: int = BLOCK_K) -> torch.Tensor:
    """`scores_reference` by the Triton kernel: x (NX, T, C) and A (NB, C, H * KEYS_PADDED) of one dtype (fp16 /
    bf16), NB a multiple of NX."""
    if x.dim() != 3 or a.dim() != 3 or a.shape[1] != x.shape[2] or a.shape[2] % KEYS_PADDED:
        raise ValueError(f"scores: x (NX, T, C) and A (NB, C, H * {KEYS_PADDED}) expected, got {tuple(x.shape)} "
                         f"and {tuple(a.shape)}")
    nx, tokens, c = x.shape
    nb, heads = a.shape[0], a.shape[2] // KEYS_PADDED
    if nb % nx or a.dtype != x.dtype:
        raise ValueError(f"scores: {nb} images of A over {nx} of x, dtypes {a.dtype} and {x.dtype}")
    x = x.contiguous()
    a = a.contiguous()
    block_n, block_n2 = head_blocks(KEYS_PADDED)
    p = torch.empty(nb, tokens, heads * KEYS_PADDED, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(tokens, block_m), heads, nb)
    _folded_cross_scores_kernel[grid](x, a, p, tokens, c, nb // nx, KEYS=TEXT_TOKENS, HEADS=heads, KP=KEYS_PADDED,
                                      BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_N2=block_n2,
                                      EVEN_K=c % block_k == 0, num_warps=num_warps, num_stages=num_stages,
                                      **pdl.launch_args(x.device))
    return p


if triton is not None:

    @torch.library.custom_op("cnrt::folded_cross_scores", mutates_args=(), device_types="cuda")
    def _scores_op(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """`scores` as an operator torch.compile keeps whole (one kernel in the compiled part's graph)."""
        return scores(x, a)

    @_scores_op.register_fake
    def _(x, a):
        return x.new_empty(a.shape[0], x.shape[1], a.shape[2])


def attend(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cross-attention and its output projection without its bias: softmax(x A) B, (NB, T, C_out), for x
    (NX, T, C) the normed rows (NX may be a divisor of NB: image i of the output reads x[i // (NB // NX)])."""
    if x.is_cuda and triton is not None:
        p = torch.ops.cnrt.folded_cross_scores(x, a)
    else:
        p = scores_reference(x, a)
    return torch.bmm(p, b)
