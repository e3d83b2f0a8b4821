"""The twin encoder's CFG doubling, [copy, copy] per network, as one copy kernel of ours.

Why: until its first cross-attention the twin runs one copy of the CFG batch (cond = uncond), then doubles its
stream (`twin._double_images`, `twin._double_rows`). As a concatenation, Inductor folds the doubling's view chain
(permute, reshape, cat) into the kernels that read it, whose indices then go through its divisions. The twenty-second
session made it an opaque `torch.cat` instead: Inductor's kernels got 0.48 ms a loop faster (100 kernels fewer), but
ATen's copy kernels, launched without PDL, cost 0.29 ms, and the loop tied (64.09 against 64.10 ms on one H100,
bench/NOTES.md). Here the copy is one Triton kernel launched with PDL like the step's other kernels: it reads each
network's rows once and writes them twice.

On by default since the twenty-third session: `bench.ab` on one H100, 63.90 against 64.05 ms a loop (Inductor's
kernels 0.42 ms faster, the copies 0.22 ms; replays byte-identical, eager equal). CNRT_MATERIALIZE_DOUBLING=0 goes
back to the concatenation Inductor folds.
"""

from __future__ import annotations

import torch

from engines.torch_fast import pdl
from profiles.config import env_flag

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch.cat
    triton = tl = None

ENABLED = env_flag("CNRT_MATERIALIZE_DOUBLING", True)
BLOCK = 2048  # elements a program: 4 warps of 16-byte fp16 vectors, 4 of them a thread

if triton is not None:
    from engines.torch_fast.pdl import pdl_begin, pdl_end

    @triton.jit
    def _twice_kernel(src_ptr, dst_ptr, PER_GROUP, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """Program (i, g): elements [i * BLOCK, (i + 1) * BLOCK) of group g's PER_GROUP, stored at the same offset
        in both halves of the group's doubled rows."""
        pdl_begin(PDL)
        group = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < PER_GROUP
        values = tl.load(src_ptr + group * PER_GROUP + offs, mask=ok)
        pdl_end(PDL)
        out = dst_ptr + group * 2 * PER_GROUP + offs
        tl.store(out, values, mask=ok)
        tl.store(out + PER_GROUP, values, mask=ok)


def twice(t: torch.Tensor) -> torch.Tensor:
    """torch.cat([t, t], dim=1) for t (G, X, ...) by `_twice_kernel` (a CUDA tensor, or any under the
    interpreter); the result is contiguous."""
    if t.dim() < 2:
        raise ValueError(f"twice needs (G, X, ...), got shape {tuple(t.shape)}")
    t = t.contiguous()
    out = t.new_empty(t.shape[0], 2 * t.shape[1], *t.shape[2:])
    per_group = t[0].numel()
    if out.numel():
        _twice_kernel[(triton.cdiv(per_group, BLOCK), t.shape[0])](t, out, per_group, BLOCK=BLOCK, num_warps=4,
                                                                  **pdl.launch_args(t.device))
    return out


@torch.library.custom_op("cnrt::twice_along_1", mutates_args=())
def twice_op(t: torch.Tensor) -> torch.Tensor:
    """`twice` as an operator torch.compile keeps whole, so its readers see a plain contiguous buffer (torch.cat
    where Triton or a GPU is missing)."""
    if t.is_cuda and triton is not None:
        return twice(t)
    return torch.cat([t, t], dim=1).contiguous()


@twice_op.register_fake
def _(t):
    return t.new_empty(t.shape[0], 2 * t.shape[1], *t.shape[2:])


def twice_along_1(t: torch.Tensor) -> torch.Tensor:
    """cat([t, t], dim=1): through `twice_op` with ENABLED, else as the concatenation Inductor may fold."""
    return twice_op(t) if ENABLED else torch.cat([t, t], dim=1)
