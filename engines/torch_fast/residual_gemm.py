"""Linear layers that add their residual inside the GEMM: c += a @ b, in place, as one cuBLAS call.

Why: each transformer block ends with `h = ff2(g) + h` and the Transformer2DModel with `proj_out(h) + x`. Compiled,
the first is a cuBLAS GEMM and then an Inductor kernel that reads the product and h back to add them and the bias
(2-5 us a call at 256x384, 16 calls a step on an H200; bench/NOTES.md, session 9); the second's sum is materialised
by whichever kernel reads it first. A GEMM can do the add itself: with beta = 1 cuBLAS reads C while it writes the
product.
ATen's out-of-place addmm / baddbmm first copy C into a fresh output, which would cost the kernel back. So this is an
operator that MUTATES c (`torch.addmm(c, a, b, out=c)`): the caller makes c = h + bias, which Inductor computes in
the kernel that already produces h (the third layer norm's; for proj_out, the group norm's that reads x), and
Inductor's re-inplacing pass hands that buffer to the operator without a copy, because nothing else reads it.

Numerics: fp32 accumulation of a @ b plus c, rounded once (the two-kernel form rounded the product and then the sum).
"""

from __future__ import annotations

import torch

from profiles.config import env_flag

# 0: matmul, then a separate add, as before (A/B measurements)
FEED_FORWARD = env_flag("CNRT_ACCUMULATE_FF", True)  # the feed-forward's second linear + h
PROJ_OUT = env_flag("CNRT_ACCUMULATE_PROJ_OUT", True)  # proj_out + the transformer's input
# The last block's ff2 folded into proj_out (`parts.feed_forward_out_weight`): one GEMM over [h, g] instead of two
FOLD_FF_PROJ_OUT = env_flag("CNRT_FOLD_FF_PROJ_OUT", True)


def folds_feed_forward(blocks: int) -> bool:
    """Whether a transformer of `blocks` BasicTransformerBlocks runs its last ff2 inside proj_out: with both
    accumulations on, and one block (SD1.5's), so that the pre-norm and block-loop forms stay as they are.

    Why: nothing but a sum lies between the last ff2 and proj_out, so
        proj_out(h + g W2) = [h, g] @ [Wp; W2 Wp]   (h carrying ff2's bias, as the accumulating form has it)
    The GEGLU kernel writes g beside h ([h, g] rows, `triton_geglu.geglu(prefix=h)`) and one accumulating GEMM with
    K = 5C replaces ff2's (K = 4C) and proj_out's (K = C): the same arithmetic, one launch fewer a transformer.
    H100 loop: 69.01 against 69.33 ms (bench/NOTES.md, thirteenth session)."""
    return FOLD_FF_PROJ_OUT and FEED_FORWARD and PROJ_OUT and blocks == 1


@torch.library.custom_op("cnrt::accumulate_mm", mutates_args=("c",))
def _accumulate_op(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if c.dim() == 2:
        torch.addmm(c, a, b, out=c)
    else:
        torch.baddbmm(c, a, b, out=c)


@_accumulate_op.register_fake
def _(c, a, b):
    return None


def accumulate_mm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c += a @ b in place and return c. 2-D: (M, K) @ (K, N); 3-D: batched (G, M, K) @ (G, K, N). c must be a
    contiguous tensor of the product's shape and dtype that no one else reads (the caller's fresh residual sum)."""
    if a.dim() != c.dim() or b.dim() != c.dim() or c.dim() not in (2, 3):
        raise ValueError(f"accumulate_mm: c {tuple(c.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}: "
                         "expected all 2-D or all 3-D")
    if c.shape[-2:] != (a.shape[-2], b.shape[-1]) or a.shape[-1] != b.shape[-2] or a.shape[:-2] != c.shape[:-2] \
            or b.shape[:-2] != c.shape[:-2]:
        raise ValueError(f"accumulate_mm: shapes do not chain: c {tuple(c.shape)} += a {tuple(a.shape)} @ "
                         f"b {tuple(b.shape)}")
    if not c.is_contiguous():
        raise ValueError("accumulate_mm: c must be contiguous (it is written in place)")
    _accumulate_op(c, a, b)
    return c


def linear_plus_residual(g: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None",
                         residual: torch.Tensor) -> torch.Tensor:
    """g @ weight + bias + residual as one GEMM accumulating into (residual + bias).

    weight is (in, out) (a transposed nn.Linear weight, or the twin's stacked (G, in, out)); bias (out,) or
    (G, out); residual has the product's shape. With a 2-D weight, g and residual may carry leading batch
    dimensions: they are flattened into rows."""
    if bias is None:
        c = residual.clone()
    else:
        c = residual + (bias if weight.dim() == 2 else bias[:, None, :])
    if weight.dim() == 2:
        rows = accumulate_mm(c.reshape(-1, c.shape[-1]).contiguous(), g.reshape(-1, g.shape[-1]), weight)
        return rows.reshape(residual.shape)
    return accumulate_mm(c.contiguous(), g, weight)
