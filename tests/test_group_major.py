"""A convolution handing its output group-major to the group norm after it (opt-in `CNRT_CONV1_GROUP_MAJOR`).

CPU: the norm read group-major against the channels_last one; the Triton convolutions through the interpreter,
which must give the same bytes group-major as NHWC (the same partial sums, added in the same order); a fused ResNet
block with conv1 group-major against diffusers'. GPU: the same equality at the step's shapes and configs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engines.torch_fast.parts import group_major_fits, group_norm_silu_from_group_major, stacked_group_norm
from tests.triton_interpreter import run_interpreted


def _group_major(y: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, groups, H*W, C/groups), as conv2d_nhwc(..., out_group_major=C/groups) returns."""
    n, c, h, w = y.shape
    return y.permute(0, 2, 3, 1).reshape(n, h * w, groups, c // groups).permute(0, 2, 1, 3)


@pytest.mark.parametrize("stacks", [1, 2])
def test_norm_from_group_major_is_the_channels_last_norm(stacks):
    torch.manual_seed(0)
    x = (torch.randn(2 * stacks, 256, 4, 6) * 3 + 1).half().contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(stacks, 256) if stacks > 1 else torch.randn(256)).half()
    bias = torch.randn_like(weight)
    got = group_norm_silu_from_group_major(_group_major(x, 32).contiguous(), 1e-5, weight, bias, 4, 6)
    want = F.silu(stacked_group_norm(x, 32, 1e-5, weight, bias))
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


def _kernel_names(fn, *inputs) -> "list[str]":
    pytest.importorskip("triton")
    from bench.inductor_cpu_code import triton_kernels

    return [name for name, _ in triton_kernels(fn, *inputs)]


def test_norm_from_group_major_partials_compiles_to_one_kernel():
    """What the form is for: Inductor makes one kernel of the split-K sum, the bias, the statistics and the apply
    (here Inductor's Triton code generator on the CPU, which lacks the GPU's loop ordering after fusion), where the
    channels_last form of the same norm takes two."""
    from engines.torch_fast.triton_conv import sum_partials

    torch.manual_seed(0)
    parts = torch.randn(4, 4, 32, 24, 40)  # 4 split-K partials of a twin 4x6 map of 1280 channels, group-major
    bias, weight, beta = torch.randn(1280).half(), torch.randn(1280).half(), torch.randn(1280).half()

    def group_major(p):
        total = sum_partials(p, unrolled=True) + bias.float().reshape(1, 32, 1, 40)
        return group_norm_silu_from_group_major(total.half(), 1e-5, weight, beta, 4, 6)

    def channels_last(p):
        rows = sum_partials(p, unrolled=True).permute(0, 2, 1, 3).reshape(4, 24, 1280) + bias.float()
        x = rows.half().reshape(4, 4, 6, 1280).permute(0, 3, 1, 2)
        return F.silu(stacked_group_norm(x, 32, 1e-5, weight, beta))

    assert len(_kernel_names(group_major, parts)) == 1
    assert len(_kernel_names(channels_last, parts)) == 2


def test_group_major_fits_only_small_maps_of_whole_runs():
    assert group_major_fits(1280, 4, 6, 32)  # 40 channels a group, 960 elements
    assert group_major_fits(1280, 8, 12, 32)  # 3840 elements
    assert group_major_fits(2560, 8, 12, 32)  # 80 channels, 7680 elements: the largest
    assert not group_major_fits(1920, 8, 12, 32)  # 60 channels: not whole 16-byte runs
    assert not group_major_fits(1280, 16, 24, 32)  # 15360 elements a group
    assert not group_major_fits(320, 4, 6, 32)  # 10 channels


CONV_CHECK = r"""
import sys
import torch
from engines.torch_fast.triton_conv import ConvConfig, conv2d_nhwc, weight_matrix
cin, cout, h, w, split, groups, tma, extras = (int(v) for v in sys.argv[1:])
torch.manual_seed(2)
n, per_group = 2 * groups, cout // 32
x = torch.randn(n, cin, h, w).half().contiguous(memory_format=torch.channels_last)
shortcut = torch.randn(n, 64, h, w).half().contiguous(memory_format=torch.channels_last) if extras else None
residual = torch.randn(n, cout, h, w).half().contiguous(memory_format=torch.channels_last) if extras else None
mats = [weight_matrix(torch.randn(cout, cin, 3, 3).half() * 0.05,
                      torch.randn(cout, 64, 1, 1).half() * 0.05 if extras else None) for _ in range(groups)]
mat = mats[0] if groups == 1 else torch.stack(mats)
bias = torch.randn(groups, cout).half() if groups > 1 else torch.randn(cout).half()
cfg = ConvConfig(16, 32, 32, split, 4, 2, box=(1, 4, 4) if tma else None)
args = (mat, bias, 3, 1, 1, cfg, groups)
nhwc = conv2d_nhwc(x, *args, shortcut=shortcut, residual=residual)
want = nhwc.permute(0, 2, 3, 1).reshape(n, h * w, 32, per_group).permute(0, 2, 1, 3)
got = conv2d_nhwc(x, *args, shortcut=shortcut, residual=residual, out_group_major=per_group)
assert got.shape == (n, 32, h * w, per_group) and got.dtype == torch.float16, (got.shape, got.dtype)
print(int(torch.equal(got, want)), (got.float() - want.float()).abs().max().item())
"""


@pytest.mark.parametrize("tma", [0, 1])
@pytest.mark.parametrize("cin,cout,h,w,split,groups,extras", [(64, 256, 4, 6, 1, 1, 0), (64, 256, 5, 7, 3, 2, 0),
                                                                (128, 512, 4, 6, 2, 1, 1)])
def test_convolution_hands_its_output_group_major_interpreted(cin, cout, h, w, split, groups, extras, tma):
    """Gather and TMA kernels; finished rows (no split: a view) and group-major split-K partials (halos, twin groups,
    the 1x1 shortcut and the residual): the bytes of the NHWC output, regrouped."""
    args = [str(v) for v in (cin, cout, h, w, split, groups, tma, extras)]
    equal, diff = run_interpreted(CONV_CHECK, args, timeout=600).strip().splitlines()[-1].split()
    assert equal == "1", f"max abs difference {diff}"


RESNET_CHECK = r"""
import torch
from diffusers.models.resnet import ResnetBlock2D
from engines.torch_fast import fused_resnet
from engines.torch_fast.fused_resnet import FusedResnet
from engines.torch_fast.parts import _resnet
from engines.torch_fast.triton_conv import ConvConfig
torch.manual_seed(0)
blocks = [ResnetBlock2D(in_channels=64, out_channels=256, temb_channels=32, groups=32).eval() for _ in range(2)]
for b in blocks:
    for p in b.parameters():
        p.data.normal_(0, 0.05)
    b.half()
x = torch.randn(4, 64, 4, 6).half().contiguous(memory_format=torch.channels_last)
emb = torch.randn(1, 32).half()
temb = [b.time_emb_proj(torch.nn.functional.silu(emb))[0] for b in blocks]
fused = FusedResnet(tuple(blocks), ConvConfig(16, 32, 32, 2, 4, 2, box=(1, 4, 4)), ConvConfig(16, 32, 32, 1, 4, 2))
seen = []
norm = fused_resnet.group_norm_silu_from_group_major
fused_resnet.group_norm_silu_from_group_major = lambda *a: seen.append(1) or norm(*a)
fused_resnet.CONV1_GROUP_MAJOR = True
bias = torch.stack([t + b.conv1.bias for t, b in zip(temb, blocks)])
with torch.no_grad():
    got = fused(x, bias).float()
    ref = torch.cat([_resnet(b.float(), xs.float(), t.float()) for b, xs, t in zip(blocks, x.chunk(2), temb)])
assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
print(len(seen), ((got - ref).norm() / ref.norm()).item())
"""


def test_fused_resnet_with_conv1_group_major_equals_diffusers_interpreted():
    """A twin pair of blocks 64 -> 256 channels (8 a norm group) at 4x6: conv1 (TMA, split 2) hands the second norm
    its partial sums group-major; conv2 adds the 1x1 shortcut."""
    calls, error = run_interpreted(RESNET_CHECK, [], timeout=900).strip().splitlines()[-1].split()
    assert calls == "1"
    assert float(error) < 3e-3


@pytest.mark.gpu
@pytest.mark.parametrize("cin,h,w,tma,split,groups", [(1280, 4, 6, 0, 4, 2), (2560, 4, 6, 0, 10, 1),
                                                      (1280, 8, 12, 1, 4, 2), (2560, 8, 12, 1, 8, 1)])
def test_convolution_hands_its_output_group_major_on_gpu(cin, h, w, tma, split, groups):
    """The step's conv1 shapes at 4x6 and 8x12 with their H100 table's tiles: the NHWC output's bytes, regrouped."""
    from engines.torch_fast.triton_conv import ConvConfig, conv2d_nhwc, output_box, weight_matrix

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    torch.manual_seed(0)
    n, cout = 2 * groups, 1280
    x = torch.randn(n, cin, h, w, device="cuda").half().contiguous(memory_format=torch.channels_last)
    mats = [weight_matrix(torch.randn(cout, cin, 3, 3, device="cuda").half() * 0.02) for _ in range(groups)]
    mat = mats[0] if groups == 1 else torch.stack(mats)
    bias = torch.randn(groups, cout, device="cuda").half() if groups > 1 else torch.randn(cout, device="cuda").half()
    cfg = ConvConfig(64, 128, 64, split, 4, 5, box=output_box(2, h, w, 64) if tma else None)
    want = _group_major(conv2d_nhwc(x, mat, bias, 3, 1, 1, cfg, groups), 32)
    got = conv2d_nhwc(x, mat, bias, 3, 1, 1, cfg, groups, out_group_major=40)
    assert torch.equal(got, want)
