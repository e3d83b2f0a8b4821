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
import os

import torch
import torch.nn.functional as F

from engines.torch_fast import linear_norm, norm_matmul, pdl, triton_conv
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
    def _folded_cross_scores_kernel(x_ptr, a_ptr, p_ptr, ws_ptr, count_ptr, TOKENS, C, X_SHARE, C_SPLIT,
                                    KEYS: tl.constexpr, HEADS: tl.constexpr, KP: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                                    BLOCK_N2: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                                    PDL: tl.constexpr = False):
        # One program: BLOCK_M rows (tokens) of image b, one head; scores x A_h over C in BLOCK_K steps as two exact
        # column blocks (BLOCK_N + BLOCK_N2 = KP), then the softmax in registers and P_h in fp16. EVEN_K: C is a
        # multiple of BLOCK_K (every SD1.5 width), so no channel mask.
        # SPLIT > 1: the channels split over SPLIT programs (C_SPLIT each); each stores its fp32 partial scores
        # and the last of them to arrive (a counter per row block) adds the SPLIT partials in split order, so
        # the sum does not depend on who finished last, resets the counter and runs the softmax.
        pdl_begin(PDL)
        pid_m = tl.program_id(0)
        head = tl.program_id(1)
        b = tl.program_id(2) // SPLIT
        part = tl.program_id(2) % SPLIT
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < TOKENS
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = tl.arange(0, BLOCK_N)
        offs_n2 = BLOCK_N + tl.arange(0, BLOCK_N2)
        x_rows = x_ptr + ((b // X_SHARE) * TOKENS + offs_m[:, None]).to(tl.int64) * C
        a_cols = a_ptr + b.to(tl.int64) * C * (HEADS * KP) + head * KP
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N2], tl.float32)
        for k0 in range(part * C_SPLIT, (part + 1) * C_SPLIT, BLOCK_K):
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
        if SPLIT > 1:
            block = (b * HEADS + head) * tl.num_programs(0) + pid_m  # this row block's counter and partials
            rows = tl.arange(0, BLOCK_M)[:, None]
            slots = ws_ptr + ((block * SPLIT) * BLOCK_M + rows) * KP
            tl.store(slots + part * BLOCK_M * KP + offs_n[None, :], acc)
            tl.store(slots + part * BLOCK_M * KP + offs_n2[None, :], acc2)
            tl.debug_barrier()  # every thread's partial is stored before the arrival
            if tl.atomic_add(count_ptr + block, 1, sem="acq_rel") == SPLIT - 1:
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                acc2 = tl.zeros([BLOCK_M, BLOCK_N2], tl.float32)
                for i in tl.static_range(SPLIT):
                    acc += tl.load(slots + i * BLOCK_M * KP + offs_n[None, :], cache_modifier=".cg")
                    acc2 += tl.load(slots + i * BLOCK_M * KP + offs_n2[None, :], cache_modifier=".cg")
                tl.atomic_xchg(count_ptr + block, 0, sem="relaxed")  # ready for the next launch
                _scores_softmax(acc, acc2, p_ptr, b, head, offs_m, m_ok, offs_n, offs_n2, TOKENS, KEYS, HEADS, KP)
        else:
            _scores_softmax(acc, acc2, p_ptr, b, head, offs_m, m_ok, offs_n, offs_n2, TOKENS, KEYS, HEADS, KP)

    @triton.jit
    def _scores_softmax(acc, acc2, p_ptr, b, head, offs_m, m_ok, offs_n, offs_n2, TOKENS, KEYS: tl.constexpr,
                        HEADS: tl.constexpr, KP: tl.constexpr):
        """The scores kernel's end: the padded keys masked, the softmax per row and P_h stored in fp16."""
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
# The channel split's largest factor (CNRT_FOLDED_CROSS_SPLIT=1: none) and the programs it aims for: at 8x12 and 4x6
# the grid (row blocks x heads x images) is 32-64 programs, each streaming a 205 KB slice of A on its own.
MAX_SPLIT = int(os.environ.get("CNRT_FOLDED_CROSS_SPLIT", 4))
SPLIT_TARGET_PROGRAMS = 128


def channel_split(programs: int, channels: int, block_k: int = BLOCK_K, max_split: "int | None" = None) -> int:
    """How many programs share each row block's channels: the largest power of two up to max_split (MAX_SPLIT)
    that keeps the grid at most SPLIT_TARGET_PROGRAMS and divides the channels into whole BLOCK_K steps."""
    split = 1
    limit = MAX_SPLIT if max_split is None else max_split
    while (split * 2 <= limit and programs * split * 2 <= SPLIT_TARGET_PROGRAMS
           and channels % (split * 2 * block_k) == 0):
        split *= 2
    return split


def scores(x: torch.Tensor, a: torch.Tensor, block_m: int = BLOCK_M, num_warps: int = 4,
           num_stages: int = 4, block_k: int = BLOCK_K, split: "int | None" = None) -> torch.Tensor:
    """`scores_reference` by the Triton kernel: x (NX, T, C) and A (NB, C, H * KEYS_PADDED) of one dtype (fp16 /
    bf16), NB a multiple of NX. split: programs per row block over the channels (default `channel_split`)."""
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
    blocks = triton.cdiv(tokens, block_m) * heads * nb
    if split is None:
        split = channel_split(blocks, c, block_k)
    if split > 1 and c % (split * block_k):
        raise ValueError(f"scores: {c} channels do not split into {split} runs of {block_k}-channel steps")
    ws = counts = p  # unread without a split
    if split > 1:
        ws = torch.empty(blocks * split * block_m * KEYS_PADDED, device=x.device, dtype=torch.float32)
        counts = triton_conv._tile_counters(x.device, a, blocks)
    grid = (triton.cdiv(tokens, block_m), heads, nb * split)
    _folded_cross_scores_kernel[grid](x, a, p, ws, counts, tokens, c, nb // nx, c // split, KEYS=TEXT_TOKENS,
                                      HEADS=heads, KP=KEYS_PADDED, BLOCK_M=block_m, BLOCK_K=block_k,
                                      BLOCK_N=block_n, BLOCK_N2=block_n2, EVEN_K=c % block_k == 0, SPLIT=split,
                                      num_warps=num_warps, num_stages=num_stages, **pdl.launch_args(x.device))
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
