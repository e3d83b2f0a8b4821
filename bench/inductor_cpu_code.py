"""`python3 -m bench.inductor_cpu_code --group-norm 4,320,32,48`: the Triton kernels Inductor generates for a
function, on a machine without a GPU.

Why: "how does Inductor compile this formulation" (which kernels, what it fuses, how it splits and indexes a
reduction) cost a device call each time; the twenty-fourth session spent one finding that a group norm written
another way compiled to more kernels. Inductor's Triton code generator also serves CPU tensors
(`config.cpu_backend = "triton"`); only building the kernels needs a Triton driver, which a CPU-only machine lacks.
`triton_kernels` runs the code generator and records each kernel's source where Inductor would build it, so the
kernels are generated (fusion, tiling, index arithmetic) but never run.

What differs from the GPU:
- the heuristics that read the device (split reductions, which count SMs; launch configs) see the CPU, so a
  reduction the GPU splits is generated whole here;
- Inductor's loop ordering after fusion runs only for GPU devices (`is_gpu` in its `ir.py` and `scheduler.py`):
  here a node's loops are merged before fusion, so a pointwise node whose loops the GPU would reorder to join a
  reduction stays a kernel of its own. The twenty-fifth session met this: a group norm written group-major was
  one kernel on the GPU (torch 2.11) and two here (bench/NOTES.md);
- this machine's torch (2.13) is not the GPU machine's (2.11).
Indexing and the other fusion decisions are the GPU's.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from typing import Callable

import torch
import torch.nn.functional as F


class KernelsNotBuilt(RuntimeError):
    """Raised where the compiled function would run a recorded kernel."""


@contextlib.contextmanager
def _recording(kernels: list):
    """Inductor in Triton-for-CPU mode, with each kernel's build replaced by a record of (name, source)."""
    import torch._inductor.codegen.triton as triton_codegen
    import torch.utils._triton as triton_utils
    from torch._inductor import async_compile
    from torch._inductor import config as cfg

    class _NotBuilt:
        def __getattr__(self, name):
            raise KernelsNotBuilt("inductor_cpu_code: the kernels are recorded, not built; they cannot run")

    def record(self, kernel_name, source_code, device_str="cuda"):
        kernels.append((kernel_name, source_code))
        return _NotBuilt()

    saved = [(async_compile.AsyncCompile, "triton", async_compile.AsyncCompile.triton),
             (triton_utils, "triton_hash_with_backend", triton_utils.triton_hash_with_backend)]
    if hasattr(triton_codegen, "triton_hash_with_backend"):
        saved.append((triton_codegen, "triton_hash_with_backend", triton_codegen.triton_hash_with_backend))
    async_compile.AsyncCompile.triton = record
    for owner, name, _ in saved[1:]:  # the kernels' cache key asks the (absent) driver for its backend
        setattr(owner, name, lambda: "inductor-cpu-code")
    try:
        with cfg.patch(cpu_backend="triton", force_disable_caches=True, compile_threads=1):
            yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def triton_kernels(fn: Callable, *inputs: torch.Tensor) -> "list[tuple[str, str]]":
    """[(kernel name, Triton source)] Inductor generates for fn(*inputs) (CPU tensors), in the order its wrapper
    defines them (for a graph without branches, the order it launches them)."""
    kernels: list = []
    torch._dynamo.reset()
    with _recording(kernels):
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        with contextlib.suppress(KernelsNotBuilt):  # the compiled module is built; running its kernels is not
            compiled(*inputs)
    torch._dynamo.reset()
    if not kernels:
        raise RuntimeError("inductor_cpu_code: Inductor generated no Triton kernels (is this torch's Inductor "
                           "still able to emit Triton for CPU tensors?)")
    return kernels


def summary(source: str) -> str:
    """One line: the kernel's iteration sizes (xnumel, r0_numel) and its load / store counts."""
    sizes = " ".join(f"{m.group(1)}={m.group(2)}" for m in re.finditer(r"^\s*(xnumel|r0_numel) = (\d+)", source,
                                                                      re.MULTILINE))
    return f"{sizes} loads={source.count('tl.load(')} stores={source.count('tl.store(')}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group-norm", default="4,320,32,48", help="B,C,H,W of silu(group_norm(x)) as the step computes "
                   "it (channels_last, `parts.stacked_group_norm`)")
    p.add_argument("--source", action="store_true", help="print each kernel's source too")
    args = p.parse_args(argv)
    from engines.torch_fast.compile import _inductor_settings
    from engines.torch_fast.parts import stacked_group_norm

    _inductor_settings()
    b, c, h, w = (int(v) for v in args.group_norm.split(","))
    x = torch.randn(b, c, h, w).half().contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c).half(), torch.randn(c).half()
    for name, source in triton_kernels(lambda t: F.silu(stacked_group_norm(t, 32, 1e-5, weight, bias)), x):
        print(f"{name}: {summary(source)}")
        if args.source:
            print(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
