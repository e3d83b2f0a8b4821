"""Programmatic dependent launch (PDL): the next kernel is launched while this one ends. On by default (CNRT_PDL=0
turns it off) for our Triton kernels and, through `compile.py`, for Inductor's.

Why: the captured loop is about 8,900 kernels, most of them a few microseconds long, one after another on one
stream. Between two dependent kernels the GPU drains the first grid, then launches and ramps up the second. With
PDL (Hopper and later) a kernel launched with the programmatic-serialisation attribute may be scheduled as soon as
every program of the kernel before it has called `griddepcontrol.launch_dependents`; it then blocks in
`griddepcontrol.wait` until that kernel has finished and its writes are visible. CUDA-graph capture keeps the edge
(a programmatic dependency).

The rule every PDL kernel here keeps: it waits before its first load or store (`pdl_begin()` first in ours), and
signals only after it waited: after its main loop (`pdl_end`, the default), or right after the wait
(CNRT_PDL_TRIGGER=start). So a kernel touches memory only once everything before it has finished, and a chain
of PDL kernels stays ordered exactly as a plain stream is (a kernel without the attribute, such as a cuBLAS GEMM,
waits for full completion as usual). Inductor's own rule (TORCHINDUCTOR_ENABLE_PDL=1) waits only where a kernel
reads what the kernel just before it wrote, which breaks that chain; `compile.wait_before_first_access` makes every
Inductor kernel wait instead.

Measured (bench/NOTES.md): on an H200 (eighth session) our kernels alone gave 72.05 against 72.11 ms, and Inductor's
own rule drifted the captured loop from the eager one. On an H100 (twelfth session), ours and Inductor's with a
wait in every kernel: 70.27 against 70.70 ms, replays and eager byte-identical; with our kernels signalling after
their main loop instead of at their start (fourteenth session), 66.97 against 67.61 ms, the same bytes. It needs
compute capability 9.0 and is off under Triton's interpreter (no `griddepcontrol` there).
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

REQUESTED = env_flag("CNRT_PDL", True)
# Where our kernels let the next kernel be scheduled: "end" (after their main loop, `pdl_end`; a kernel without that
# call triggers as its programs exit) or "start" (right after their wait, as until the fourteenth session). H100 loop:
# 66.97 ms at the end against 67.61 at the start, the same latent bytes (bench/NOTES.md, fourteenth session).
TRIGGER = os.environ.get("CNRT_PDL_TRIGGER", "end")
if TRIGGER not in ("start", "end"):
    raise ValueError(f"CNRT_PDL_TRIGGER must be start or end, got {TRIGGER!r}")


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: asked for, a Hopper-or-later GPU, not interpreted."""
    return (REQUESTED and device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a launch of one of our kernels on `device`: the kernel's PDL switch and, only when on,
    the launch attribute (Dynamo rejects that keyword when it traces a launch: the direct path of `triton_conv`)."""
    if not enabled(device):
        return {"PDL": False}
    return {"PDL": 1 if TRIGGER == "start" else 2, "launch_pdl": True}


if triton is not None:

    @triton.jit
    def pdl_begin(PDL: tl.constexpr):
        """A PDL kernel's first statement: wait until the kernel before has finished (its writes visible); with
        PDL == 1 (trigger at the start) then let the next kernel be scheduled. Nothing without PDL."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            if PDL == 1:
                tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def pdl_end(PDL: tl.constexpr):
        """With PDL == 2 (trigger at the end): let the next kernel be scheduled, after the main loop. Why later: with
        the trigger at the start, the group-norm statistics after a 216-program, 8-warp 32x48 convolution ran 19-20
        us past its end on an H100, against 7 us after a 4-warp one (the same kernel). Our reading: the next
        kernel's programs are placed while this one still holds the SMs, only on those with room left, and then run
        there (bench/NOTES.md, fourteenth session)."""
        if PDL == 2:
            tl.extra.cuda.gdc_launch_dependents()
