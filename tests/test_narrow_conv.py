"""CNRT_NARROW_CONV_CONFIG: the opt-in config of the step's conv_out (320 -> 4) outside the tuning table.

CPU: the variable's parsing, which convolutions it replaces, and the gather kernel with the narrow tiles (16 and 32
columns, K splits of the real K = 9 x 320 = 45 steps of 64) through Triton's interpreter, against conv2d in float32.
"""

from __future__ import annotations

import pytest

from engines.torch_fast import triton_conv
from engines.torch_fast.triton_conv import ConvConfig
from tests.triton_interpreter import run_interpreted

TUNED = ConvConfig(64, 64, 64, 5, 4, 3)  # the H100 table's conv_out config


def test_narrow_config_from_environment(monkeypatch):
    monkeypatch.delenv("CNRT_NARROW_CONV_CONFIG", raising=False)
    assert triton_conv._narrow_config() is None
    monkeypatch.setenv("CNRT_NARROW_CONV_CONFIG", " 64,16,9,4,3 ")
    assert triton_conv._narrow_config() == ConvConfig(64, 16, 64, 9, 4, 3)


@pytest.mark.parametrize("value", ["64,16,9,4", "64,16,9,4,3,1", "64,sixteen,9,4,3", "64,8,9,4,3", "48,16,9,4,3",
                                   "64,16,0,4,3"])
def test_malformed_narrow_config_is_refused(monkeypatch, value):
    monkeypatch.setenv("CNRT_NARROW_CONV_CONFIG", value)
    with pytest.raises(ValueError, match="CNRT_NARROW_CONV_CONFIG"):
        triton_conv._narrow_config()


def test_only_narrow_convolutions_take_the_override(monkeypatch):
    narrow = ConvConfig(32, 16, 64, 9, 4, 3)
    monkeypatch.setattr(triton_conv, "NARROW_CONFIG", None)
    assert triton_conv.narrow_override(TUNED, 4) is TUNED  # unset: the table's config
    monkeypatch.setattr(triton_conv, "NARROW_CONFIG", narrow)
    assert triton_conv.narrow_override(TUNED, 4) == narrow  # conv_out
    assert triton_conv.narrow_override(TUNED, 16) == narrow
    assert triton_conv.narrow_override(TUNED, 320) is TUNED


def test_splits_must_divide_conv_outs_k_steps():
    """conv_out's K is 45 steps of 64 (9 taps x 320 channels): splits 3, 5, 9, 15 fit, 4 does not."""
    for split in (3, 5, 9, 15):
        assert triton_conv.supports(320, 3, ConvConfig(64, 16, 64, split, 4, 3))
    assert not triton_conv.supports(320, 3, ConvConfig(64, 16, 64, 4, 4, 3))


NARROW_CHECK = r"""
import sys
import torch, torch.nn.functional as F
from torch import nn
from engines.torch_fast import triton_conv
from engines.torch_fast.gemm_conv import TritonConv2d
from engines.torch_fast.triton_conv import ConvConfig
n, cin, h, w = (int(v) for v in sys.argv[1:])
cfg = triton_conv.narrow_override(ConvConfig(64, 64, 64, 5, 4, 3), 4)  # as the runner looks it up
assert cfg == triton_conv.NARROW_CONFIG, cfg
torch.manual_seed(4)
conv = nn.Conv2d(cin, 4, 3, 1, 1).half()
x = torch.randn(n, cin, h, w).half().contiguous(memory_format=torch.channels_last)
got = TritonConv2d(conv, cfg)(x).float()
ref = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), 1, 1)
assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
print(((got - ref).norm() / ref.norm()).item())
"""


@pytest.mark.parametrize("config,n,cin", [
    ("64,16,9,4,3", 2, 320),  # the real K: 45 steps, 5 per split
    ("32,16,9,4,3", 2, 320),
    ("32,32,15,4,3", 1, 320),
    ("64,16,9,4,3", 2, 64),  # 9 steps: one per split, one tap each
])
def test_narrow_tiles_equal_conv2d_interpreted(monkeypatch, config, n, cin):
    """The gather kernel with 16- and 32-column tiles on a small conv_out (n x cin x 8x12 -> 4, bias, split-K
    partials summed outside), the config taken from CNRT_NARROW_CONV_CONFIG as the runner takes it."""
    monkeypatch.setenv("CNRT_NARROW_CONV_CONFIG", config)
    out = run_interpreted(NARROW_CHECK, [str(n), str(cin), "8", "12"])
    assert float(out.strip().splitlines()[-1]) < 2e-3


def test_narrow_tiles_compile_for_sm90_without_spills():
    """conv_out's real shape (2x320x32x48 -> 4) compiled for an H100 on the CPU (bench.sass): 64x16 tiles take
    one warpgroup's 64x16x16 wgmma, 32x16 tiles mma.sync; neither spills."""
    sass = pytest.importorskip("bench.sass")
    if sass.triton is None:
        pytest.skip("needs Triton")
    wide = sass.sass(sass.KERNELS["conv-narrow"]())
    counts = sass.summary(wide)
    assert counts["wgmma"] > 0 and "HGMMA.64x16x16" in wide
    small = sass.summary(sass.sass(sass.KERNELS["conv-narrow-32"]()))
    assert small["wgmma"] == 0 and small["mma.sync (HMMA)"] > 0
    for c in (counts, small):
        assert c["spill stores"] == 0 and c["spill loads"] == 0
