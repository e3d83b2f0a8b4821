"""The one-kernel GroupNorm (+ SiLU) computes group_norm * weight + bias (then SiLU) of channels_last maps.

CPU: the kernel's two halves (statistics; combine + apply) through Triton's interpreter, on group widths that pad
(10, 20, 30 channels a group), maps whose rows do not fill the last sub-tile or program, stacked twin affines, and
inputs with a large mean (where one-pass sums of squares would cancel). The split plan. GPU: the one-launch kernel
with its grid barrier on the step's shapes, replayed in a CUDA graph, against the torch reference.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import run_interpreted

NORM_CHECK = r"""
import sys
import torch
from engines.torch_fast import triton_group_norm
from engines.torch_fast.triton_group_norm import group_norm_nhwc, reference
b, c, h, w, groups, stacks, silu, offset, one_tile = (int(v) for v in sys.argv[1:])
triton_group_norm.ONE_TILE_ELEMENTS = 16384 if one_tile else 0  # rows in registers, or sub-tiles in a loop
torch.manual_seed(0)
x = (torch.randn(b, c, h, w) * 3 + offset).half().contiguous(memory_format=torch.channels_last)
weight = (torch.rand(stacks, c) + 0.5).half().reshape(-1) if stacks == 1 else (torch.rand(stacks, c) + 0.5).half()
bias = torch.randn(weight.shape).half()
got = group_norm_nhwc(x, groups, 1e-5, weight, bias, bool(silu), site=3)
ref = reference(x, groups, 1e-5, weight, bias, bool(silu))
assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous(memory_format=torch.channels_last)
print((got.float() - ref.float()).abs().max().item())
"""


@pytest.mark.parametrize("one_tile", [1, 0], ids=["one-tile", "sub-tiles"])
@pytest.mark.parametrize("b,c,h,w,groups,stacks,silu,offset", [
    (2, 320, 8, 12, 32, 1, 1, 0),    # 10 channels a group (padded to 16), SiLU
    (4, 640, 4, 6, 32, 2, 1, 0),     # twin: two stacked affines; 24 rows, one partial program
    (2, 960, 5, 7, 32, 1, 0, 0),     # 30 a group; 35 rows that fill no sub-tile evenly; no SiLU
    (1, 64, 3, 3, 16, 1, 1, 40),     # mean 40 against std 3
])
def test_group_norm_kernel_equals_reference_interpreted(b, c, h, w, groups, stacks, silu, offset, one_tile):
    out = run_interpreted(NORM_CHECK, [str(v) for v in (b, c, h, w, groups, stacks, silu, offset, one_tile)],
                          timeout=600)
    assert float(out.strip().splitlines()[-1]) < 1e-2  # fp16 output: ~2 ulp at |y| <= 4


def test_plan_covers_every_row_within_the_program_limit():
    from engines.torch_fast.triton_group_norm import plan

    for images, hw, channels in ((4, 1536, 320), (2, 1536, 960), (2, 96, 1280), (4, 24, 2560), (1, 98304, 128)):
        for one_tile_elements in (0, 16384):
            p = plan(images, hw, channels, 32, 132, one_tile_elements=one_tile_elements)
            assert images * p["programs_per_image"] <= 132
            if p["one_tile"]:
                assert p["rows_per_program"] <= p["sub"] and p["sub"] * 32 * p["cpg_pad"] <= one_tile_elements
                continue
            assert p["rows_per_program"] % p["sub"] == 0 or p["sub"] > hw
            assert (p["programs_per_image"] - 1) * p["rows_per_program"] < hw <= p["programs_per_image"] * p[
                "rows_per_program"]
            assert p["sub"] * 32 * p["cpg_pad"] <= 8192 and p["cpg_pad"] >= channels // 32


def test_fits_rejects_what_the_kernel_cannot_take():
    from engines.torch_fast.triton_group_norm import fits

    x = torch.zeros(2, 320, 8, 8).contiguous(memory_format=torch.channels_last)
    assert fits(x, 32)
    assert not fits(torch.zeros(2, 320, 8, 8), 32)  # NCHW memory
    assert not fits(x, 30)  # not a power-of-two group count
    assert not fits(torch.zeros(200, 320, 2, 2).contiguous(memory_format=torch.channels_last), 32, 132)


@pytest.mark.gpu
@pytest.mark.parametrize("b,c,h,w,stacks", [(4, 320, 32, 48, 2), (2, 960, 32, 48, 1), (2, 640, 16, 24, 1),
                                            (4, 1280, 8, 12, 2), (2, 2560, 4, 6, 1), (2, 1920, 16, 24, 1)])
def test_group_norm_kernel_on_gpu_in_a_cuda_graph(b, c, h, w, stacks):
    from engines.torch_fast.triton_group_norm import group_norm_nhwc, reference

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    torch.manual_seed(0)
    x = (torch.randn(b, c, h, w, device="cuda") * 2 + 1).half().contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(stacks, c, device="cuda") + 0.5).half().squeeze(0)
    bias = torch.randn(weight.shape, device="cuda").half()
    ref = reference(x, 32, 1e-5, weight, bias, True)
    out = group_norm_nhwc(x, 32, 1e-5, weight, bias, True, site=1)  # warm-up (compiles; makes the workspace)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = group_norm_nhwc(x, 32, 1e-5, weight, bias, True, site=1)
    first = None
    for _ in range(50):  # the barrier words must come back to the same state after every launch
        graph.replay()
        if first is None:
            torch.cuda.synchronize()
            first = out.clone()
    torch.cuda.synchronize()
    assert (out.float() - ref.float()).abs().max().item() < 1e-2
    assert torch.equal(out, first)  # deterministic: the partials combine in a fixed order
