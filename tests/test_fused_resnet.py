"""The fused ResNet block (conv1 with the time embedding as bias, conv2 with the shortcut as extra K rows or the
residual in its epilogue) computes what diffusers' block computes.

CPU: the Triton kernels through Triton's interpreter (tests/triton_interpreter.py); the time-table fold. GPU: the
compiled kernels at sd15 sizes, single and twin.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from engines.torch_fast.fused_resnet import (FusedResnet, can_fuse, fold_conv1_bias, fused_conv2_shape,
                                             fused_if_tuned, shortcut_channels)
from engines.torch_fast.triton_conv import ConvConfig
from tests.triton_interpreter import run_interpreted

RESNET_CHECK = r"""
import sys
import torch
from diffusers.models.resnet import ResnetBlock2D
from engines.torch_fast.fused_resnet import FusedResnet
from engines.torch_fast.parts import _resnet
from engines.torch_fast.triton_conv import ConvConfig
cin, cout, pair, split = (int(v) for v in sys.argv[1:])
torch.manual_seed(0)
blocks = [ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=32, groups=32).eval()
          for _ in range(2 if pair else 1)]
for b in blocks:  # diffusers zero-inits nothing here, but make every term visible
    for p in b.parameters():
        p.data.normal_(0, 0.05)
    b.half()
x = torch.randn(2 * len(blocks), cin, 4, 6).half().contiguous(memory_format=torch.channels_last)
emb = torch.randn(1, 32).half()
temb = [b.time_emb_proj(torch.nn.functional.silu(emb))[0] for b in blocks]
cfg1 = ConvConfig(16, 32, 32, 1, 4, 2)
cfg2 = ConvConfig(16, 32, 32, split, 4, 2)
fused = FusedResnet(tuple(blocks), cfg1, cfg2)
bias = torch.stack([t + b.conv1.bias for t, b in zip(temb, blocks)])
with torch.no_grad():
    got = fused(x, bias if pair else bias[0]).float()
    ref = torch.cat([_resnet(b.float(), xs.float(), t.float()) for b, xs, t in zip(blocks, x.chunk(len(blocks)), temb)])
assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
print(((got - ref).norm() / ref.norm()).item())
"""


@pytest.mark.parametrize("cin,cout,pair,split", [(64, 64, 0, 1), (64, 96, 0, 1), (96, 64, 1, 1), (64, 64, 1, 2),
                                                 (64, 128, 0, 2)])
def test_fused_resnet_equals_diffusers_block_interpreted(cin, cout, pair, split):
    """Shortcut (cin != cout) and identity residual, one block and a twin pair, with and without split-K."""
    out = run_interpreted(RESNET_CHECK, [str(v) for v in (cin, cout, pair, split)], timeout=600)
    assert float(out.strip().splitlines()[-1]) < 3e-3


def test_can_fuse_only_plain_blocks():
    assert can_fuse(ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=32))
    assert shortcut_channels(ResnetBlock2D(in_channels=64, out_channels=128, temb_channels=32)) == 64
    assert not can_fuse(ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=32, down=True))
    assert not can_fuse(ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=32, output_scale_factor=2.0))
    assert not can_fuse(ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=32,
                                      time_embedding_norm="scale_shift"))


def test_fused_conv2_shape_carries_the_shortcut():
    block = ResnetBlock2D(in_channels=128, out_channels=64, temb_channels=32)
    shape = fused_conv2_shape(block, {block.conv2: (2, 64, 4, 6)}, groups=2)
    assert (shape.c, shape.cout, shape.shortcut, shape.groups) == (64, 64, 128, 2)
    assert "+1x1(128)" in shape.key


def test_fused_if_tuned_needs_both_convolutions_on_triton():
    pair = tuple(ResnetBlock2D(in_channels=128, out_channels=64, temb_channels=32) for _ in range(2))
    sizes = {b.conv1: (2, 128, 4, 6) for b in pair} | {b.conv2: (2, 64, 4, 6) for b in pair}
    cfg = ConvConfig(64, 64, 64, 1, 4, 3)
    asked = []

    def only(shortcut):  # a tuning table where only the conv with that shortcut (or without) is on Triton
        return lambda shape: asked.append(shape) or (cfg if shape.shortcut == shortcut else None)

    assert fused_if_tuned(pair, sizes, only(128)) is None  # conv1 stays on cuDNN
    assert [(s.c, s.groups, s.shortcut) for s in asked] == [(128, 2, 0), (64, 2, 128)]
    fused = fused_if_tuned(pair, sizes, lambda shape: cfg)
    assert isinstance(fused, FusedResnet) and fused.groups == 2 and fused.has_shortcut
    assert fused.conv2_weight.shape == (2, 9 * 64 + 128, 64)
    down = ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=32, down=True)
    assert fused_if_tuned((down,), {}, lambda shape: cfg) is None


def test_fold_adds_conv1_bias_to_fused_blocks_only():
    blocks = [ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=32) for _ in range(2)]
    table = torch.randn(3, 128)
    folded = fold_conv1_bias(table, [(0, 64), (64, 128)], blocks, {blocks[1]})
    torch.testing.assert_close(folded[:, :64], table[:, :64])
    torch.testing.assert_close(folded[:, 64:], table[:, 64:] + blocks[1].conv1.bias.detach())


@pytest.mark.gpu
@pytest.mark.parametrize("cin,cout,hw,pair", [(2560, 1280, (8, 12), 0), (640, 320, (32, 48), 0),
                                              (320, 640, (16, 24), 1), (1280, 1280, (4, 6), 1)])
def test_fused_resnet_matches_diffusers_on_sd15_sizes(cin, cout, hw, pair):
    from engines.torch_fast.fused_resnet import FusedResnet
    from engines.torch_fast.parts import _resnet
    from engines.torch_fast.triton_conv import candidate_configs

    torch.manual_seed(0)
    blocks = [ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=1280).eval().cuda().half()
              for _ in range(2 if pair else 1)]
    n = 2 * len(blocks)
    x = torch.randn(n, cin, *hw, device="cuda").half().contiguous(memory_format=torch.channels_last)
    emb = torch.randn(1, 1280, device="cuda").half()
    with torch.no_grad():
        temb = [b.time_emb_proj(torch.nn.functional.silu(emb))[0] for b in blocks]
        ref = torch.cat([_resnet(b, xs, t).float() for b, xs, t in zip(blocks, x.chunk(len(blocks)), temb)])
        bias = torch.stack([t + b.conv1.bias for t, b in zip(temb, blocks)])
        m = n * hw[0] * hw[1]
        for split_conf in (0, -1):  # the first and last candidate configs (no split / most split)
            cfg1 = candidate_configs(m, cout, cin, 3)[split_conf]
            cfg2 = candidate_configs(m, cout, cout, 3, cin if cin != cout else 0)[split_conf]
            got = FusedResnet(tuple(blocks), cfg1, cfg2)(x, bias if pair else bias[0]).float()
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < 3e-3, f"{cfg1} / {cfg2}: relative error {err:.2e}"
