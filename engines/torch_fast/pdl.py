"""Programmatic dependent launch (PDL) for our Triton kernels: the next kernel starts while this one ends.

Why: the captured loop is about 10,000 kernels, most of them a few microseconds long, one after another on one
stream. Between two dependent kernels the GPU drains the first grid, then launches and ramps up the second, and
the question was how much of the loop that costs. With PDL (Hopper and later) a kernel launched
with the programmatic-serialisation attribute may be scheduled as soon as every program of the kernel before it
has called `griddepcontrol.launch_dependents`; it then blocks in `griddepcontrol.wait` until that kernel has
finished and its writes are visible. CUDA-graph capture keeps the edge (a programmatic dependency).

The rule every PDL kernel here keeps: `pdl_begin()` first, before any load or store, and it waits before it signals.
So a kernel signals only once everything before it has finished, and a chain of PDL kernels stays ordered exactly
as a plain stream is (a kernel without the attribute, such as a cuBLAS GEMM, waits for full completion as usual).
Inductor's own kernels have a switch of their own (TORCHINDUCTOR_ENABLE_PDL=1) that waits only where a kernel
reads what the kernel just before it wrote.

Measured (bench/NOTES.md, eighth session, one H200): loop 72.05 ms with CNRT_PDL=1 against 72.11 without, the
captured loop equal to eager byte for byte; with Inductor's switch too, 71.94 ms, but the eager loop then differed
from the captured one. The gaps between kernels are ~0.3 us already, so there is little to hide. CNRT_PDL=1 turns
it on for our kernels (off by default); it needs compute capability 9.0 and is off under Triton's interpreter (no
`griddepcontrol` there).
"""

from __future__ import annotations

import os

import torch

from profiles.config import env_flag

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

REQUESTED = env_flag("CNRT_PDL", False)


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: asked for, a Hopper-or-later GPU, not interpreted."""
    return (REQUESTED and device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a launch of one of our kernels on `device`: the kernel's PDL switch and, only when on,
    the launch attribute (Dynamo rejects that keyword when it traces a launch: the direct path of `triton_conv`)."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


if triton is not None:

    @triton.jit
    def pdl_begin(PDL: tl.constexpr):
        """A PDL kernel's first statement: wait until the kernel before has finished (its writes visible), then
        let the next kernel be scheduled. Nothing without PDL."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
